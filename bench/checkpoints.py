"""Checkpoints and weights files: torch's pickles, read weights-only (tensors and plain containers), so a file
from someone else cannot run code here; a damaged one is named, never a crash of the reader."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from bench.records import atomic_write


def save_torch(obj, path: Path) -> None:
    """Save tensors and plain containers only (what ``load_torch`` accepts)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class UnreadableFile(Exception):
    """A checkpoint or weights file that is damaged, or that only a code-running load could read."""


# the lines of torch's weights-only failure message around the one that says what was wrong
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def load_torch(path: Path, map_location=None):
    """A checkpoint or weights file, read with ``weights_only=True``: tensors and plain containers only.

    A .pt file is a pickle; a full load would run whatever code a crafted file names (a results
    folder or checkpoint from someone else, say). This one never does. Raises UnreadableFile with
    what went wrong and what to do.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps every failure of its weights-only unpickler in one long message; only a refused
        # GLOBAL (a class or function the pickle names) means code, anything else (a bad opcode) is damage
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if any("global" in line.lower() for line in lines):
            raise UnreadableFile(f"{path} holds objects beyond tensors and plain containers (written by other "
                                 f"software, or crafted to run code): refused. Delete it and rerun its run to "
                                 f"regenerate it") from e
        detail = next((line for line in lines if not line.startswith(_TORCH_BOILERPLATE)), lines[0] if lines else "")
        raise UnreadableFile(f"{path} is damaged ({type(e).__name__}: {detail})") from e
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated zip, an empty file, a bad header: torch raises many types
        raise UnreadableFile(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
