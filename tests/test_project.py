"""The project file, label checks and one-line user errors, through the real ``kdops`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kdops.errors import LabelMismatch
from kdops.labels import align_labels
from kdops.project import Project, ProjectError

from conftest import make_teacher

KDOPS = str(Path(sys.executable).with_name("kdops"))


def kdops(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDOPS_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("KDOPS_DEBUG", None)
    return subprocess.run([KDOPS, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The error a user sees: exit 2, one line on stderr, no traceback."""
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr  # progress bars may come before it
    assert "Traceback" not in res.stderr + res.stdout
    return errors[0]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny local teacher whose labels are neg / pos."""
    out = tmp_path_factory.mktemp("teacher")
    model = make_teacher(tiny_tokenizer)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(str(out), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture
def user_csv(tmp_path) -> Path:
    """A user's binary task whose labels are not neg / pos."""
    words = ["good movie", "bad film", "great plot", "awful actor", "nice story", "boring book"]
    rows = [{"review": f"{w} {i}", "verdict": "fresh" if j % 2 == 0 else "rotten"} for i in range(10) for j, w in enumerate(words)]
    path = tmp_path / "reviews.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_project_round_trip_and_errors(tmp_path):
    p = Project(root=tmp_path).with_("task", labels=("a", "b"), label_map={"x": "a"}).with_("data", train="data/t.csv")
    (tmp_path / "kdops.toml").write_text(p.to_toml())
    q = Project.load(tmp_path / "kdops.toml")
    assert q.task.labels == ("a", "b") and q.task.label_map == {"x": "a"}
    assert q.resolve(q.data.train) == str(tmp_path / "data/t.csv")
    assert q.resolve("corpus:questions:train") == "corpus:questions:train"
    (tmp_path / "bad.toml").write_text("[task]\ncolour = 'red'\n")
    with pytest.raises(ProjectError, match=r"unknown key\(s\) \['colour'\] in \[task\]"):
        Project.load(tmp_path / "bad.toml")
    (tmp_path / "bad.toml").write_text("[task]\nlabels = ['a']\n[task.label_map]\nx = 'zz'\n")
    with pytest.raises(ProjectError, match="not in labels"):
        Project.load(tmp_path / "bad.toml")


def test_align_labels_names_both_sets_and_maps():
    rows = pd.DataFrame({"text": ["a", "b", "c"], "label": ["fresh", "rotten", None]})
    with pytest.raises(LabelMismatch, match=r"labels \['fresh', 'rotten'\] but the teacher knows \['neg', 'pos'\]"):
        align_labels(rows, ["neg", "pos"])
    mapped = align_labels(rows, ["neg", "pos"], {"fresh": "pos", "rotten": "neg"})
    assert mapped["label"].tolist()[:2] == ["pos", "neg"] and pd.isna(mapped["label"].iloc[2])
    unlabelled = pd.DataFrame({"text": ["a"], "label": [None]})
    assert align_labels(unlabelled, ["neg", "pos"]) is unlabelled


def test_distill_refuses_labels_the_teacher_lacks_then_uses_the_map(tmp_path, user_csv, teacher_dir):
    home = tmp_path / "home"
    res = kdops("distill", "--train", str(user_csv), "--out", str(tmp_path / "s"), "--teacher-dir", str(teacher_dir),
                cwd=tmp_path, home=home)
    # kdops data ingest's columns are the defaults here: the text column is missing, said in one line
    assert "missing column(s) ['text']" in one_line_error(res)
    init = kdops("init", "--data", str(user_csv), "--text-column", "review", "--label-column", "verdict",
                 "--teacher-dir", str(teacher_dir), cwd=tmp_path, home=home)
    assert init.returncode == 0, init.stderr
    assert "labels (2): fresh 30, rotten 30" in init.stdout
    assert not (tmp_path / "s").exists()
    # the project declares fresh/rotten, the teacher knows neg/pos: refused before any training
    err = one_line_error(kdops("distill", "--out", str(tmp_path / "s"), "--epochs", "1", cwd=tmp_path, home=home))
    assert "['neg', 'pos']" in err and "['fresh', 'rotten']" in err
    assert not (tmp_path / "s").exists()
    text = (tmp_path / "kdops.toml").read_text()
    text = text.replace('labels = ["fresh", "rotten"]', 'labels = ["neg", "pos"]')
    text = text.replace("[task.label_map]  #", '[task.label_map]\nfresh = "pos"\nrotten = "neg"\n#')
    (tmp_path / "kdops.toml").write_text(text)
    ok = kdops("distill", "--out", str(tmp_path / "s"), "--epochs", "1", "--layers", "1", cwd=tmp_path, home=home)
    assert ok.returncode == 0, ok.stderr[-2000:]
    from kdops.artifacts import Artifact

    assert Artifact.read(tmp_path / "s").label_names == ("neg", "pos")


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, user_csv, teacher_dir):
    home = tmp_path / "home"
    assert "no such model directory" in one_line_error(kdops("evaluate", str(tmp_path / "nowhere"), "--data", str(user_csv),
                                                   "--teacher-dir", str(teacher_dir), cwd=tmp_path, home=home))
    (tmp_path / "kdops.toml").write_text("[task\n")
    assert "not valid TOML" in one_line_error(kdops("distill", "--out", "s", cwd=tmp_path, home=home))
    debug = kdops("--debug", "distill", "--out", "s", cwd=tmp_path, home=home)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ProjectError" in debug.stderr
    (tmp_path / "kdops.toml").unlink()
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert "no rows" in one_line_error(kdops("data", "ingest", str(empty), cwd=tmp_path, home=home))


def test_shipped_example_projects_load_and_match_their_corpora():
    from kdops import corpora

    root = Path(__file__).resolve().parent.parent / "examples"
    sentiment, questions = Project.load(root / "sentiment/kdops.toml"), Project.load(root / "questions/kdops.toml")
    assert sentiment.task.labels == corpora.SENTIMENT_LABELS and questions.task.labels == corpora.QUESTION_LABELS
    assert sentiment.teacher_path == root / "sentiment/.kdops/teachers/minilm-sentiment"  # where `make demo` bootstraps it
    assert questions.resolve(questions.data.train) == "corpus:questions:train" and questions.serve.model == "kdops-questions"
