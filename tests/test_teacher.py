"""D2LLM teacher scoring on a tiny random causal LM: the score is sigmoid((z_yes - z_no) / T) of the
full model's next-token logits, left-padded batches score as single prompts do, the question stays
after query and passage under truncation, and bad answer words / templates fail clearly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import CHAT, CORPUS, NO, YES
from toolkit.teacher.scoring import Teacher, TeacherPrompt


@pytest.fixture(scope="module")
def tiny_causal(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = CHAT  # an instruction-tuned teacher's prompt is a user turn
    return model, tok


def make(tiny_causal, **prompt) -> Teacher:
    model, tok = tiny_causal
    return Teacher(model, tok, TeacherPrompt(yes=YES, no=NO, **prompt))


def test_score_is_the_yes_no_logit_gap_of_the_full_model(tiny_causal):
    teacher = make(tiny_causal, temperature=2.0)
    model, _ = tiny_causal
    q, p = CORPUS[0], CORPUS[3]
    scores, feats = teacher.score([q], [p], features=True)
    ids = torch.tensor([teacher.render(q, p, symmetric=False)])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    logits = out.logits[0, -1]
    want = torch.sigmoid((logits[teacher.yes_id] - logits[teacher.no_id]) / 2.0)
    assert scores[0].item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.allclose(feats[0], out.hidden_states[-1][0, -1], atol=1e-5)


def test_left_padded_batch_scores_like_single_prompts(tiny_causal):
    teacher = make(tiny_causal)
    queries, passages = CORPUS[:5], [CORPUS[7], CORPUS[2] + " " + CORPUS[4], CORPUS[1], CORPUS[6], CORPUS[0]]
    flags = [False, True, False, True, False]
    batched, feats = teacher.score(queries, passages, flags, batch_size=5, features=True)
    for i in range(5):
        single, f = teacher.score([queries[i]], [passages[i]], flags[i], features=True)
        assert single[0].item() == pytest.approx(batched[i].item(), abs=1e-5)
        assert torch.allclose(f[0], feats[i], atol=1e-4)
    assert not torch.allclose(batched[1:2], teacher.score([queries[1]], [passages[1]], False)[0])  # templates differ


def test_question_comes_last_and_survives_truncation(tiny_causal):
    teacher = make(tiny_causal, max_length=120, max_query_tokens=8)
    _, tok = tiny_causal
    long_passage = " ".join(CORPUS[:8])
    ids = teacher.render(CORPUS[0], long_passage, symmetric=False)
    assert len(ids) <= 120
    text = tok.decode(ids)
    assert text.endswith("Answer yes or no.\nassistant: ")
    assert text.index("Query:") < text.index("Passage:") < text.index("Does the passage")


def test_bad_answer_words_and_templates_fail_clearly(tiny_causal):
    model, tok = tiny_causal
    with pytest.raises(ValueError, match=r"teacher\.yes: 'yes' is 3 tokens"):
        Teacher(model, tok, TeacherPrompt(yes="yes", no=NO))
    with pytest.raises(ValueError, match=r"teacher\.yes: ' y' is 2 tokens"):  # no chat: the answer follows a space
        Teacher(model, tok, TeacherPrompt(yes=YES, no=NO, chat=False))
    with pytest.raises(ValueError, match="must come after"):
        TeacherPrompt(asymmetric="Does the passage answer? {query} {passage}")
    with pytest.raises(ValueError, match="must contain"):
        TeacherPrompt(symmetric="{query} only. Answer:")
    with pytest.raises(ValueError, match="no room for the passage"):
        make(tiny_causal, max_length=90).render(CORPUS[0], CORPUS[1], symmetric=True)
