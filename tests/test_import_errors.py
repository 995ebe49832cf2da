"""``moetrain import`` refuses bad input with one message naming the file, field or tensor and the fix,
exit code 2, and leaves nothing behind: no RUN_DIR, no temporary folder beside it (the run directory is
built in one and renamed into place only when complete).

Each case breaks one thing in a folder transformers wrote (tests/hf_runs.py): the architecture, a shard
(missing, truncated), a config value moetrain cannot represent, the tokenizer, the weights' format (pickles
only, integer weights), code the folder would need (``auto_map``), a tensor the mapping does not know,
shapes that disagree with config.json, an override that changes the model, or a RUN_DIR that holds files.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from hf_runs import hf_folder
from safetensors.torch import load_file, save_file

from moetrain.cli import main

pytestmark = pytest.mark.timeout(300)


def edit_config(src, **fields) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **fields}))


def edit_weights(src, change) -> None:
    """Rewrite the single shard with ``change(tensors)`` applied."""
    path = src / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def break_source(case: str, src, run) -> list[str]:
    """Break ``src`` (or ``run``) for ``case``; returns extra command-line arguments."""
    if case == "architecture":
        edit_config(src, model_type="llama", architectures=["LlamaForCausalLM"])
    elif case == "missing_shard":
        shards = sorted(src.glob("model-*.safetensors"))
        assert len(shards) > 2
        shards[1].unlink()
    elif case == "truncated_shard":
        shard = sorted(src.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-64])
    elif case == "field_value":
        edit_config(src, hidden_act="gelu")
    elif case == "tokenizer":
        (src / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    elif case == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (src / name).unlink()
    elif case == "pickles_only":
        for shard in src.glob("*.safetensors"):
            shard.unlink()
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    elif case == "remote_code":
        edit_config(src, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    elif case == "unknown_tensor":
        edit_weights(src, lambda t: t.update({"model.layers.0.mlp.extra_bias": torch.zeros(4)}))
    elif case == "integer_weights":
        edit_weights(src, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int8)}))
    elif case == "shapes":
        edit_config(src, intermediate_size=32)  # the dense block's MLP is 40 wide in the weights
    elif case == "override":
        return ["train.steps=5", "model.d_model=64"]
    elif case == "run_dir":
        run.mkdir()
        (run / "keep.txt").write_text("mine")
    return []


CASES = {  # case: (variant layout, what the one message says)
    "architecture": ("files", "SRC: config.json field model_type = 'llama': not a supported family; supported: "
                              "deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe"),
    "missing_shard": ("sharded", "is missing (model.safetensors.index.json puts"),
    "truncated_shard": ("sharded", "is not a readable safetensors file"),
    "field_value": ("files", "SRC: config.json field hidden_act = 'gelu': moetrain's SwiGLU uses silu"),
    "tokenizer": ("files", "does not load: data.tokenizer:"),
    "no_tokenizer": ("files", "holds no tokenizer (tokenizer.json"),
    "pickles_only": ("files", "holds its weights only as PyTorch pickles (pytorch_model.bin)"),
    "remote_code": ("files", "names code of its own (auto_map"),
    "unknown_tensor": ("files", "mapping reads no model.layers.0.mlp.extra_bias"),
    "integer_weights": ("files", "SRC: tensor model.norm.weight is I8; moetrain imports fp32, bf16 or fp16"),
    "shapes": ("files", "the weights and config.json disagree"),
    "override": ("files", "overrides change the imported model:\n  - model.d_model: 32 -> 64"),
    "run_dir": ("files", "already holds files; give a new or empty folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_message_exit_2_and_nothing_written(case, tmp_path, capsys):
    layout, message = CASES[case]
    src, run = tmp_path / "src", tmp_path / "run"
    hf_folder("qwen2_moe-mlp_only", src, layout)
    extra = break_source(case, src, run)
    capsys.readouterr()
    code = main(["import", str(src), str(run), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and message in err, err
    assert "Traceback" not in err
    if case == "run_dir":
        assert [p.name for p in run.iterdir()] == ["keep.txt"]
    else:
        assert not run.exists()
    assert not list(tmp_path.glob(".run.import-*"))  # no half-written run directory beside it


def test_the_command_exits_2_as_a_process(tmp_path):
    src = tmp_path / "src"
    hf_folder("mixtral", src, "files")
    edit_config(src, router_jitter_noise=0.1)
    proc = run_cli("import", str(src), str(tmp_path / "run"), timeout=200)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
    assert "config.json field router_jitter_noise = 0.1" in proc.stderr and not (tmp_path / "run").exists()


def test_a_failure_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    """The disk fills while the weights are written (the 5th tensor): one message, exit 2, no RUN_DIR and
    no temporary folder."""
    from moetrain.checkpoint import streaming

    src, run = tmp_path / "src", tmp_path / "run"
    hf_folder("qwen2_moe-mlp_only", src, "files")
    write, count = streaming.SafetensorsWriter.write, []

    def failing(self, key, tensor):
        count.append(key)
        if len(count) == 5:
            raise OSError(28, "No space left on device")
        write(self, key, tensor)

    monkeypatch.setattr(streaming.SafetensorsWriter, "write", failing)
    capsys.readouterr()
    code = main(["import", str(src), str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "No space left on device" in err, err
    assert len(count) == 5 and not run.exists() and not list(tmp_path.glob(".run.import-*"))
