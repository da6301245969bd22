"""What every stage writes the same way (:mod:`finetune.report.writer`) and the HTML page of
``posebert report`` that gathers them: :mod:`~finetune.report.collect` (what a run folder
holds), :mod:`~finetune.report.sections` and :mod:`~finetune.report.html` (the page),
:mod:`~finetune.report.curves`, :mod:`~finetune.report.skeletons` and
:mod:`~finetune.report.embedding_map` (the figures), :mod:`~finetune.report.samples` (the
contract of the prediction samples a head leaves to be drawn), :mod:`~finetune.report.cli`."""

from finetune.report.writer import (
    command_line,
    gap_closed,
    md_table,
    pyplot,
    read_stage,
    record_command,
    save_figure,
    write_stage,
)

__all__ = ["command_line", "gap_closed", "md_table", "pyplot", "read_stage", "record_command",
           "save_figure", "write_stage"]  # fmt: skip
