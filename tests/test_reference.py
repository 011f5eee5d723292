"""The reference pages: the generated ones equal what the code gives today (a new config field
or flag fails here until `python reference.py` is run), and the hand-written ones name every
exit code and the checkpoint format version the code has."""
from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest

import checkpoint
import errors
import pipeline_config
import reference
from config import SECTIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = REPO_ROOT / "docs" / "reference"


@pytest.fixture(scope="module")
def rendered() -> dict[Path, str]:
    return {path: render() for path, render in reference.PAGES.items()}


def test_committed_pages_equal_what_the_code_generates(rendered):
    stale = reference.stale_pages(REPO_ROOT, rendered)
    assert not stale, f"{', '.join(p.as_posix() for p in stale)}: run `{reference.REGENERATE}` and commit"


def test_check_names_a_stale_page_and_passes_on_fresh_ones(tmp_path, rendered, capsys):
    shutil.copytree(REFERENCE, tmp_path / "docs" / "reference")
    assert reference.main(["--check", "--root", str(tmp_path)]) == 0
    config_page = tmp_path / "docs" / "reference" / "config.md"
    config_page.write_text(config_page.read_text(encoding="utf-8").replace("transformer blocks", "blocks"),
                           encoding="utf-8")
    (tmp_path / "docs" / "reference" / "commands.md").unlink()
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1
    said = capsys.readouterr().err
    assert "docs/reference/config.md is stale; regenerate it with `python reference.py`" in said
    assert "docs/reference/commands.md is missing" in said
    assert "pipeline-config.md" not in said
    assert config_page.read_text(encoding="utf-8") != rendered[Path("docs/reference/config.md")]  # wrote nothing


def test_a_field_added_to_a_section_makes_config_md_stale(monkeypatch, rendered):
    grown = dataclasses.make_dataclass("Grown", [("new_knob", int, dataclasses.field(
        default=7, metadata={"help": "a knob added without regenerating"}))], bases=(SECTIONS["training"],))
    monkeypatch.setitem(SECTIONS, "training", grown)
    page = reference.config_page()
    assert "| `--training.new_knob` | int | `7` |  | a knob added without regenerating |" in page
    assert page != rendered[Path("docs/reference/config.md")]


def test_every_config_field_is_in_config_md(rendered):
    page = rendered[Path("docs/reference/config.md")]
    for section_name, section_cls in SECTIONS.items():
        assert f"\n## {section_name}\n" in page
        for f in dataclasses.fields(section_cls):
            assert f"| `--{section_name}.{f.name}`" in page, f"{section_name}.{f.name}"


def test_every_flag_of_every_parser_is_in_commands_md(rendered):
    page = rendered[Path("docs/reference/commands.md")]
    config_page = rendered[Path("docs/reference/config.md")]
    for name, parser in reference.command_parsers().items():
        section = page.split(f"\n## {name}.py\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                generated = reference.is_generated_config_flag(action) and "." in flag
                where = config_page if generated else section
                assert f"`{flag}`" in where, f"{name}.py {flag}"
            if not action.option_strings:
                assert f"`{action.dest.upper()}`" in section, f"{name}.py {action.dest}"


def test_a_flag_a_command_adds_for_a_config_field_is_listed_with_the_command(monkeypatch):
    build = reference.importlib.import_module("train").build_parser

    def with_hand_made_flag():
        parser = build()
        parser.add_argument("--knob", dest="training.lr", metavar="LR", help="a hand-made flag for a field")
        return parser

    monkeypatch.setattr(sys.modules["train"], "build_parser", with_hand_made_flag)
    section = reference.commands_page().split("\n## train.py\n", 1)[1].split("\n## ", 1)[0]
    assert "| `--knob` | `LR` |  | a hand-made flag for a field |" in section
    assert "\n| `--training.lr`" not in section  # the generated flag stays in config.md


def test_pages_name_no_path_of_this_machine(rendered):
    for path, text in rendered.items():
        assert str(REPO_ROOT) not in text, path
    assert "`data/identity.json`" in rendered[Path("docs/reference/commands.md")]


def test_every_pipeline_config_field_is_in_its_page(rendered):
    page = rendered[Path("docs/reference/pipeline-config.md")]
    for f in dataclasses.fields(pipeline_config.PipelineConfig):
        if f.name == "source":
            continue
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        fields = dataclasses.fields(value) if dataclasses.is_dataclass(value) else [f]
        for g in fields:
            help_text = g.metadata.get("help", "")
            assert help_text, f"{f.name}.{g.name} has no help text: give it one with config_fields.option"
            row = next((line for line in page.splitlines() if line.startswith(f"| `{g.name}` |")), "")
            assert row.endswith(f"| {reference.md_cell(help_text)} |"), f"{f.name}.{g.name}: {row}"


def test_every_exit_code_is_in_exit_codes_md():
    page = (REFERENCE / "exit-codes.md").read_text(encoding="utf-8")
    codes = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert codes
    for name, value in codes.items():
        assert re.search(rf"\| `{value}` \| `{name}` \|", page), name


def test_checkpoint_format_page_names_the_current_version():
    page = (REFERENCE / "checkpoint-format.md").read_text(encoding="utf-8")
    assert f"`FORMAT_VERSION = {checkpoint.FORMAT_VERSION}`" in page
    assert f'"{checkpoint.FORMAT}"' in page
    for version in checkpoint.MIGRATIONS:
        assert f"version {version}" in page
