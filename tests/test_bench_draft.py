"""`dspark-trt bench draft`: engines with a full and a reduced draft vocabulary timed side by side."""
from dspark_trt.cli import main
from dspark_trt.bench.draft import bench_draft
from dspark_trt.export.engines import export_engines

from conftest import tiny_drafter, tiny_target


def test_bench_draft_times_each_engine_and_leaves_its_context_as_it_was(tmp_path, capsys):
    target = tiny_target(vocab_size=12, seed=3)
    for name, ids in (("full", None), ("reduced", [0, 2, 5, 7, 9])):
        export_engines(target, tiny_drafter(target, block_size=3, seed=3, draft_ids=ids), tmp_path / name)
    result = bench_draft([str(tmp_path / "full"), str(tmp_path / "reduced")], requests=(1, 2), rounds=2, context=8)
    full, reduced = result["engines"][str(tmp_path / "full")], result["engines"][str(tmp_path / "reduced")]
    assert full["draft_vocab_size"] == 12 and reduced["draft_vocab_size"] == 5
    assert all(row[k] > 0 for row in (full, reduced) for k in ("draft R=1", "draft R=2", "target B=1"))
    assert reduced["draft / target at R=1"] == reduced["draft R=1"] / reduced["target B=1"]


def test_an_engine_without_a_drafter_is_named(tmp_path, capsys):
    export_engines(tiny_target(vocab_size=12, seed=3), None, tmp_path / "plain")
    assert main(["bench", "draft", "--engines", str(tmp_path / "plain"), "--rounds", "1"]) == 2
    assert "has no drafter to time" in capsys.readouterr().err
