"""Portable paths in results (sdtp/paths.py) and the rewrite of committed results (sdtp/reports/portable_results.py)."""

from __future__ import annotations

import json

import pytest

from sdtp.paths import portable_path, portable_text, portable_tree
from sdtp.reports import portable_results
from sdtp.reports.portable_results import check_json, migrate, migrate_text

ROOTS = {"/clone/sdtp": "", "/data/mirror": "${paths.data_dir}", "/home/u": "<home>",
         "/home/u/.cache/sdtp": "${paths.cache_dir}"}


@pytest.mark.parametrize(("path", "expected"), [
    ("/clone/sdtp/results/runs/x/metrics.json", "results/runs/x/metrics.json"),
    ("/clone/sdtp", "."),
    ("/clone/sdtp/../../data/mirror/lm/wiki.raw", "${paths.data_dir}/lm/wiki.raw"),  # <root>/../ as configured
    ("/data/mirror", "${paths.data_dir}"),
    ("/home/u/.cache/sdtp/smollm2", "${paths.cache_dir}/smollm2"),  # the longest root wins
    ("/home/u/notes/a.txt", "<home>/notes/a.txt"),
    ("/scratch/run7/predictor.json", "<abs>/predictor.json"),
    ("/clone/sdtp-other/x", "<abs>/x"),  # a sibling with the root as a string prefix is not inside it
    ("results/runs/x", "results/runs/x"),  # already portable: unchanged
    ("${paths.data_dir}/lm/wiki.raw", "${paths.data_dir}/lm/wiki.raw"),
])
def test_portable_path_forms(path, expected):
    assert portable_path(path, ROOTS) == expected
    assert portable_path(expected, ROOTS) == expected  # idempotent


def test_portable_text_rewrites_only_path_tokens():
    text = ("PYTHONPATH=.:/scratch/kvproj sdtp-eval 'eval.data_file=/data/mirror/lm/w.raw' "
            "--out /clone/sdtp/results/p; "
            "see https://example.org/a/b, file:///c/d, 3/4 of tokens/s, <home>/x and ${paths.data_dir}/y")
    assert portable_text(text, ROOTS) == (  # a path-list entry after ':' too, never a URL's path
        "PYTHONPATH=.:<abs>/kvproj sdtp-eval 'eval.data_file=${paths.data_dir}/lm/w.raw' --out results/p; "
        "see https://example.org/a/b, file:///c/d, 3/4 of tokens/s, <home>/x and ${paths.data_dir}/y")


def test_portable_tree_keys_values_and_numbers():
    node = {"/data/mirror/a.jsonl": "sha", "n": [1, 2.5, None, True], "cmd": ("--run", "/clone/sdtp/r")}
    assert portable_tree(node, ROOTS) == {"${paths.data_dir}/a.jsonl": "sha", "n": [1, 2.5, None, True],
                                          "cmd": ["--run", "r"]}


def test_migration_maps_the_historic_locations():
    text = ('{"root": "/work/wt_t3", "data_dir": "/work/wt_t3/../shared/data", '
            '"cmd": "train out_dir=/work/runs/v4 --out /work/main/results/predictors/m", "x": 0.30000000000000004}')
    new = migrate_text(text)
    assert json.loads(new) == {"root": ".", "data_dir": "${paths.data_dir}",
                               "cmd": "train out_dir=<runs>/v4 --out results/predictors/m", "x": 0.30000000000000004}
    assert "0.30000000000000004" in new and migrate_text(new) == new  # numbers byte-identical; idempotent


def test_migration_refuses_to_merge_keys_or_touch_numbers(tmp_path):
    with pytest.raises(ValueError, match="more than strings"):
        check_json(tmp_path / "a.json", '{"/work/main/a": 1, "a": 2}', '{"a": 1, "a": 2}')
    check_json(tmp_path / "b.jsonl", '{"p": "/work/main/x"}\n', '{"p": "x"}\n')
    page = tmp_path / "page.md"
    page.write_text("made by `bash x.sh --out /work/wt9/results/paper`\n")
    assert migrate([page]) == [page] and page.read_text() == "made by `bash x.sh --out results/paper`\n"
    assert migrate([page]) == []


def test_committed_results_contain_no_absolute_paths(capsys):
    """Guard: every file under results/ that git would commit is portable (fix: python scripts/portable_paths.py)."""
    assert portable_results.main(["--check"]) == 0, capsys.readouterr().out
