"""GPU checks: skipped without CUDA (CI has none); run them where a GPU is lent."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_on_cuda_trains_in_bf16_and_merges(tiny_model_dir: Path, tmp_path: Path) -> None:
    from nbtuner.config import FinetuneConfig
    from nbtuner.data import identity_conversations, save_xtuner
    from nbtuner.train import run_finetune

    data = save_xtuner(identity_conversations("Nova", n=16), tmp_path / "id.json")
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "run"), method="qlora",
                         max_steps=3, batch_size=4, lr=1e-2, lora_r=8, lora_alpha=16, eval_steps=0, save_steps=0,
                         max_length=256)
    result = run_finetune(cfg)
    record = (result.run_dir / "run.json").read_text()
    assert result.status == "completed" and '"method": "qlora"' in record
    merged = result.merge(tmp_path / "merged")
    assert merged.checks["verified"]
