"""``moetrain.checkpoint.streaming.SafetensorsWriter``: a safetensors file written one tensor at a time is
the file ``safetensors`` itself reads, with every tensor bit for bit, and a writer used out of order, with
a wrong tensor or left before the last tensor raises instead of leaving a file that looks complete."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moetrain.checkpoint.streaming import SafetensorsWriter, TensorSpec


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "value/w": torch.randn(5, 3, generator=g),
        "value/bf": torch.randn(7, generator=g).to(torch.bfloat16),
        "value/half": torch.randn(2, 2, 2, generator=g).half(),
        "buffer/bits": torch.randint(-(2**31), 2**31 - 1, (4,), dtype=torch.int32, generator=g),
        "buffer/steps": torch.tensor([3, -2], dtype=torch.int64),
        "buffer/flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(3, 4, generator=g).t(),  # not contiguous: written as its values
    }


def specs(ts: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in ts.items()]


def test_the_file_reads_back_bit_for_bit(tmp_path):
    ts = tensors()
    with SafetensorsWriter(tmp_path / "a.safetensors", specs(ts), metadata={"format": "pt"}) as w:
        for k, t in ts.items():
            w.write(k, t)
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == ts.keys()
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_slice("value/w")[2:4], ts["value/w"][2:4])  # sliced reads see the same bytes
    header_len = int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0  # safetensors' alignment of the data


@pytest.mark.parametrize("mistake", ["order", "shape", "dtype", "extra", "short"])
def test_a_wrong_write_raises(tmp_path, mistake):
    ts = tensors()
    keys = list(ts)
    with pytest.raises(ValueError):
        with SafetensorsWriter(tmp_path / "b.safetensors", specs(ts)) as w:
            if mistake == "order":
                w.write(keys[1], ts[keys[1]])
            elif mistake == "shape":
                w.write(keys[0], ts[keys[0]][:4])
            elif mistake == "dtype":
                w.write(keys[0], ts[keys[0]].double())
            else:
                for k in keys if mistake == "extra" else keys[:-1]:
                    w.write(k, ts[k])
                if mistake == "extra":
                    w.write("more", torch.zeros(1))
