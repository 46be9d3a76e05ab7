"""One rank of a launched run (`python -m launchers.rank train ...`): under SLURM (`embedforge submit
slurm`) the task's identity becomes torch.distributed's env (RANK, WORLD_SIZE, LOCAL_RANK, ...);
under torchrun (`train --nproc`, `--launch torchrun`) torchrun has set it and nothing is mapped.
Then `embedforge ARGS` runs in this process.

Kept out of the training code (it never reads SLURM_*). Exit code 3 ("stopped with a checkpoint") is
reported as 0: srun's --kill-on-bad-exit and torchrun must not kill the other ranks while rank 0
still writes the run's STOPPED marker; launchers read the marker, not the exit code.

A rank that fails (an exception, an error exit) in a run of several ranks prints why and leaves with
`os._exit` at once: its peers wait in a collective, and only this process's end (gloo sees the
connection close, torchrun / srun see the exit and end the others) releases them. A normal interpreter
shutdown (atexit handlers, loader threads, the process group's destructor) can take seconds or hang.
"""

from __future__ import annotations

import os
import sys
import traceback

from toolkit.errors import EmbedforgeError


def slurm_rank_env(environ: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables from a task's SLURM variables (MASTER_ADDR / PORT come from the
    batch script: the first node of the allocation and a port derived from the job id)."""
    if "RANK" in environ:
        return {}
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT")
               if k not in environ]
    if missing:
        raise EmbedforgeError(f"not inside an `embedforge submit slurm` task: {', '.join(missing)} unset")
    local_world = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or environ.get("SLURM_TASKS_PER_NODE", "1").split("(")[0]
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"], "LOCAL_WORLD_SIZE": local_world}


def main(argv: list[str]) -> int:
    try:
        os.environ.update(slurm_rank_env(dict(os.environ)))
    except EmbedforgeError as exc:
        print(f"launchers.rank: error: {exc}", file=sys.stderr)
        return 2
    from launchers.cli import main as cli_main

    try:
        code = cli_main(argv)
    except SystemExit:
        raise
    except BaseException as exc:  # a bug or a second Ctrl-C: the traceback, then out at once
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        traceback.print_exc()
        leave_now(130 if isinstance(exc, KeyboardInterrupt) else 1)
    if code not in (0, 3) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_now(code)  # e.g. an EmbedforgeError on this rank only (its message is printed)
    return 0 if code == 3 else code


def leave_now(code: int) -> None:
    """End this rank now (see the module docstring); rank and exit code go to stderr for the job log."""
    print(f"launchers.rank: rank {os.environ.get('RANK', '?')} failed (exit {code}); leaving at once so the "
          "other ranks are ended instead of waiting in a collective", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
