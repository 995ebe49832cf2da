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


def _run(folder, val, extra=None):
    folder.mkdir()
    recs = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 10)]
    recs += [{"step": s, "val_loss": v} for s, v in val]
    recs += extra or []
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return folder


def test_report_overlays_the_validation_curves_of_several_runs(tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    a = _run(tmp_path / "stablemoe", [(0, 6.0), (5, 4.0), (9, 3.5)])
    b = _run(tmp_path / "switch", [(0, 6.0), (5, 4.2), (9, 3.7)])
    c = _run(tmp_path / "dense", [(0, 6.0), (9, 3.9)])
    plotted = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        if self.get_ylabel() == "" and "label" in kwargs:
            plotted.append((kwargs["label"], list(args[0]), list(args[1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    out = tmp_path / "cmp" / "val.png"
    assert main(["report", str(a), str(b), str(c), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    overlay = [p for p in plotted if p[0] in ("stablemoe", "switch", "dense")]
    assert overlay == [
        ("stablemoe", [0, 5, 9], [6.0, 4.0, 3.5]),
        ("switch", [0, 5, 9], [6.0, 4.2, 3.7]),
        ("dense", [0, 9], [6.0, 3.9]),
    ]
    assert (a / "loss.png").is_file() and (c / "loss.png").is_file()  # each run's own plots too
    assert f"wrote {out}" in capsys.readouterr().out
    nv = _run(tmp_path / "noval", [])
    assert main(["report", str(a), str(nv), "--out", str(out)]) == 2
    assert "noval has no validation loss" in capsys.readouterr().err


def test_report_draws_the_routing_diagnostics_with_the_switch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --out would go
    extra = [
        {"step": s, "moe/layer0/gate_mean": 0.5, "moe/layer0/gate_low_frac": 0.1, "moe/layer0/distill_acc": s / 10}
        for s in range(1, 10)
    ]
    extra.append({"step": 4, "moe/switch_step": 4, "moe/switch_reason": 2})
    run = _run(tmp_path / "run", [(9, 3.5)], extra)
    assert main(["report", str(run)]) == 0
    assert (run / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "val_loss_overlay.png").exists()  # one run: no overlay
