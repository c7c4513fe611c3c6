"""The results section writer shared by `lorkd-train report` and `lorkd-train seeds report`."""

from pathlib import Path

from lorkd.report import END, START, write_results_section


def test_results_section_is_created_then_replaced_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    write_results_section(readme, "first\n")
    assert readme.read_text().count(START) == 1 and "first\n" in readme.read_text()

    readme.write_text(f"# head\n\n{START}\nold table\n{END}\n\n## after\n")
    write_results_section(readme, "new table\n")
    assert readme.read_text() == f"# head\n\n{START}\nnew table\n{END}\n\n## after\n"

    readme.write_text("# no markers yet\n")
    write_results_section(readme, "appended\n")
    assert readme.read_text() == f"# no markers yet\n\n{START}\nappended\n{END}\n"
