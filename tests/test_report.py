"""moetrain report draws the plots from metrics.jsonl."""

import json

from moetrain.cli import main


def test_report_writes_pngs(tmp_path, capsys):
    recs = [
        {"step": s, "loss": 5.0 - s / 10, "moe/layer0/load": [s, 10 - s, 5, 5], "moe/layer1/load": [1, 2, 3, 4]}
        for s in range(1, 10)
    ]
    recs += [
        {"step": 5, "val_loss": 4.0},
        {"step": 9, "val_loss": 3.5},
        {"step": 5, "moe/layer0/fluctuation": 0.2},
        {"step": 9, "moe/layer0/fluctuation": 0.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["report", str(tmp_path)]) == 0
    for name in ("loss.png", "expert_load.png", "fluctuation.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
