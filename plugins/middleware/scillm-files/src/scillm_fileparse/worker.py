"""A file worker: reads tasks from stdin, answers on stdout, one at a time, until stdin closes.

Frames are an 8-byte big-endian length and a pickle. A task is ``("file", file_data, filename, limits, target)`` or
``("image", url, limits)``; the answer ``("ok", items)`` or ``("rejected", code, message, status)``.
``--memory-mb N`` caps the worker's address space: a file that needs more is refused, the worker survives. The
parent kills a worker whose task runs past its CPU budget or deadline, or whose caller left.
"""

from __future__ import annotations

import os
import pickle
import resource
import sys
from typing import IO, Any

from scillm_fileparse.extract import FileRejected, handle_file, handle_image

HEADER = 8


def run(task: tuple[Any, ...]) -> tuple[Any, ...]:
    kind, *args = task
    try:
        if kind == "file":
            return ("ok", handle_file(*args))
        if kind == "image":
            return ("ok", [handle_image(*args)])
        raise ValueError(f"unknown task {kind!r}")
    except FileRejected as exc:
        return ("rejected", exc.code, exc.message, exc.status)
    except MemoryError:
        return ("rejected", "file_too_complex", "processing the file needed more memory than a file worker may use "
                                                "([files] worker_memory_mb)", 413)
    except RecursionError:
        return ("rejected", "file_too_complex", "the file is nested too deeply to process", 422)
    except Exception as exc:  # a parser failure nobody anticipated is still the file's, not the server's
        return ("rejected", "unprocessable_file", f"the file cannot be processed ({type(exc).__name__})", 422)


def _read(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def _die_with_parent() -> None:
    """SIGKILL when the server goes (even by kill -9): a worker must never outlive it with a task running."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    _die_with_parent()
    if len(argv) == 2 and argv[0] == "--memory-mb":
        limit = int(float(argv[1]) * (1 << 20))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    tasks = sys.stdin.buffer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print can never corrupt a frame
    while (header := _read(tasks, HEADER)) is not None:
        payload = _read(tasks, int.from_bytes(header, "big"))
        if payload is None:
            break
        answer = pickle.dumps(run(pickle.loads(payload)), protocol=pickle.HIGHEST_PROTOCOL)
        del payload
        answers.write(len(answer).to_bytes(HEADER, "big"))
        answers.write(answer)
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
