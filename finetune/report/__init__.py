"""What every stage writes the same way (:mod:`finetune.report.writer`) and the HTML page of
``posebert report`` that gathers them."""

from finetune.report.writer import (
    command_line,
    gap_closed,
    md_table,
    pyplot,
    read_stage,
    save_figure,
    write_stage,
)

__all__ = ["command_line", "gap_closed", "md_table", "pyplot", "read_stage", "save_figure",
           "write_stage"]  # fmt: skip
