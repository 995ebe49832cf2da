"""Bad configs: one clear message naming the field, the value and the fix; exit 2; nothing written."""

import pytest
from conftest import REPO, TINY_CONFIG, run_cli

from moetrain.cli import main
from moetrain.config import load_config, parse_overrides
from moetrain.errors import UserError

BAD = [
    # (overrides, substrings the message must contain)
    (["moe.num_expert=4"], ["moe: unknown key 'num_expert'", "did you mean 'num_experts'"]),
    (["trian.steps=5"], ["unknown key 'trian'", "did you mean 'train'"]),
    (["moe.router.kind=topk", "moe.router.top_kk=2"], ["moe.router: unknown key 'top_kk'", "did you mean 'top_k'"]),
    (
        ["moe.num_experts=12", "moe.expert_parallel_size=8"],
        ["moe.num_experts (12) must be divisible by moe.expert_parallel_size (8)"],
    ),
    (["moe.router.kind=topk", "moe.router.top_k=9"], ["moe.router.top_k (9) must be <= moe.num_experts (8)"]),
    (["train.steps=-5"], ["train.steps: Input should be greater than or equal to 1 (got -5)"]),
    (["train.micro_batch_size=lots"], ["train.micro_batch_size: Input should be a valid integer", "'lots'"]),
    (["model.d_model=100", "model.n_heads=3"], ["model.d_model (100) must be divisible by model.n_heads (3)"]),
    (["moe.router.kind=magic"], ["moe.router.kind: 'magic' is not one of", "'topk'"]),
    (["moe.placement=middle"], ["moe.placement: Input should be 'replace_ffn' or 'insert' (got 'middle')"]),
    (["moe.insert_after=[7]"], ["moe.insert_after ([7]) holds 7, outside the blocks 0..3"]),
    (["data.seq_len=512"], ["data.seq_len (512) must be <= model.max_seq_len (128)"]),
    (
        ["deepspeed.train_micro_batch_size_per_gpu=4"],
        ["deepspeed.train_micro_batch_size_per_gpu (4) conflicts with train.micro_batch_size (16)"],
    ),
    (["deepspeed.optimizer={type: Adam}"], ["deepspeed.optimizer: not allowed"]),
    (["deepspeed.bf16={enabled: true}"], ["deepspeed.bf16.enabled (true) conflicts with train.precision ('fp32')"]),
    (["deepspeed.zero_optimization={stage: 4}"], ["deepspeed.zero_optimization.stage (4) must be 0, 1, 2 or 3"]),
    # ZeRO-3 combined with what it does not run with (moetrain/config/zero3.py): one message each
    (
        ["deepspeed.zero_optimization={stage: 3}", "moe.ep_overlap=true"],
        ["moe.ep_overlap (true) does not run with deepspeed.zero_optimization.stage 3", "set moe.ep_overlap=false"],
    ),
    (
        ["deepspeed.zero_optimization={stage: 3}", "train.compile=true"],
        ["train.compile (true) is not supported with deepspeed.zero_optimization.stage 3", "set train.compile=false"],
    ),
    (
        ["deepspeed.zero_optimization={stage: 3, offload_param: {device: cpu}}"],
        [
            "deepspeed.zero_optimization.offload_param ({'device': 'cpu'}) is not supported with deepspeed.zero_optimization.stage 3",
            "remove deepspeed.zero_optimization.offload_param",
        ],
    ),
    (
        ["deepspeed.zero_optimization={stage: 3, offload_optimizer: {device: cpu}}"],
        ["deepspeed.zero_optimization.offload_optimizer ({'device': 'cpu'}) is not supported"],
    ),
    (
        ["deepspeed.zero_optimization={stage: 3, zero_hpz_partition_size: 2}"],
        ["deepspeed.zero_optimization.zero_hpz_partition_size (2) is not supported", "expert-data-parallel groups"],
    ),
    (["deepspeed.zero_optimization={stage: 3, mics_shard_size: 2}"], ["mics_shard_size (2) is not supported"]),
    (
        ["deepspeed.zero_optimization={stage: 3, zero_quantized_gradients: true}"],
        ["zero_quantized_gradients (True) is not supported"],
    ),
    (["deepspeed.zero_optimization={stage: 3, zero_quantized_weights: true}"], ["zero_quantized_weights (True)"]),
    (
        ["deepspeed.zero_optimization={stage: 3, stage3_module_granularity_threshold: 1000}"],
        ["stage3_module_granularity_threshold (1000) is not supported"],
    ),
    (["moe.capacity_factor=0"], ["moe.capacity_factor: Input should be greater than 0 (got 0)"]),
    (["train.precision=fp8"], ["train.precision: Input should be 'fp32' or 'bf16' (got 'fp8')"]),
    (["train.precision=fp16"], ["train.precision: 'fp16' is not supported", "use bf16"]),
    (["deepspeed.fp16={enabled: true}"], ["deepspeed.fp16.enabled (true): fp16 training is not supported"]),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_message(overrides, expected, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", str(TINY_CONFIG), f"run_dir={run_dir}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: invalid config")
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err
    assert not run_dir.exists()


def test_bad_config_exits_2_without_traceback_in_a_real_process(tmp_path):
    proc = run_cli("validate", str(TINY_CONFIG), "moe.num_expert=4")
    assert proc.returncode == 2
    assert "did you mean 'num_experts'" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_config_file_and_bad_override_syntax(capsys):
    assert main(["validate", "does/not/exist.yaml"]) == 2
    assert "config file 'does/not/exist.yaml' does not exist" in capsys.readouterr().err
    assert main(["validate", str(TINY_CONFIG), "train.steps"]) == 2
    assert "is not of the form key.path=value" in capsys.readouterr().err


def test_validate_world_size(capsys):
    assert main(["validate", str(TINY_CONFIG), "--world-size", "4"]) == 0
    assert main(["validate", str(TINY_CONFIG), "moe.expert_parallel_size=4", "--world-size", "6"]) == 2
    assert "world size (6) must be divisible by moe.expert_parallel_size (4)" in capsys.readouterr().err


def test_overrides_parse_as_yaml_and_dash_form():
    assert parse_overrides(["a.b=1", "--c=x", "d=[1, 2]", "e=null"]) == {
        "a": {"b": 1},
        "c": "x",
        "d": [1, 2],
        "e": None,
    }
    cfg = load_config(TINY_CONFIG, ["moe=null"])
    assert cfg.moe is None


def test_cli_accepts_dash_dash_overrides(capsys):
    assert main(["validate", str(TINY_CONFIG), "--train.steps=3"]) == 0


def test_yaml_1_1_booleans_stay_the_strings_they_are(tmp_path):
    """``logging.progress: off`` (a documented value) is 'off', not False; boolean fields still take yes/no."""
    cfg = load_config(TINY_CONFIG, ["logging.progress=off", "checkpoint.save_at_end=no", "train.deterministic=on"])
    assert (cfg.logging.progress, cfg.checkpoint.save_at_end, cfg.train.deterministic) == ("off", False, True)
    path = tmp_path / "job.yaml"
    path.write_text("logging:\n  progress: on\ncheckpoint:\n  save_at_end: True\n")
    cfg = load_config(path)
    assert (cfg.logging.progress, cfg.checkpoint.save_at_end) == ("on", True)


def test_override_into_a_null_section_needs_the_whole_section(tmp_path):
    """``moe: null`` + ``moe.num_experts=4`` is refused; a mapping for the whole section replaces the null."""
    path = tmp_path / "dense.yaml"
    path.write_text("moe: null\n")
    with pytest.raises(UserError, match=r"override 'moe.num_experts=4' changes a key of 'moe', but config file"):
        load_config(path, ["moe.num_experts=4"])
    assert load_config(path).moe is None
    assert load_config(path, ["moe={num_experts: 4}"]).moe.num_experts == 4
    assert load_config(path, ["moe={}", "moe.num_experts=4"]).moe.num_experts == 4
    assert load_config(TINY_CONFIG, ["moe.num_experts=4"]).moe.num_experts == 4  # a section the file sets
    assert parse_overrides(["moe.num_experts=4"]) == {"moe": {"num_experts": 4}}


def test_a_whole_section_of_another_kind_replaces_the_section():
    """moe.router={kind: ...} with another kind drops the old router's keys; the same kind merges."""
    from moetrain.config.loading import load_config as load

    cfg = load(REPO / "configs" / "paper" / "cpu" / "lm_switch.yaml", ["moe.router={kind: expert_choice, top_k: 2}"])
    assert cfg.moe.router.kind == "expert_choice" and cfg.moe.router.top_k == 2
    cfg = load(REPO / "configs" / "paper" / "cpu" / "lm_switch.yaml", ["moe.router={kind: topk, top_k: 2}"])
    assert cfg.moe.router.init == "orthogonal" and cfg.moe.router.top_k == 2  # merged: the file's init kept
