"""The HTML report: one self-contained file built from a run store alone.

``build_report(run_dir)`` renders every section of :data:`SECTIONS` that has data. Results that
are not training statistics (saliency grids, metric and bias tables) enter the store as blobs
through :func:`store_image` and :func:`store_table`, tagged with the section that shows them.
"""

from bbdecoder.report.blobs import figure_png, latest_records, read_table, store_image, store_table
from bbdecoder.report.builder import REPORT_FILENAME, ReportSectionWarning, build_report
from bbdecoder.report.html import Section
from bbdecoder.report.overlays import store_overlays
from bbdecoder.report.section_tokens import store_token_maps
from bbdecoder.report.sections import SECTIONS, BlobSection, ReportContext, blob_section

__all__ = [
    "REPORT_FILENAME",
    "SECTIONS",
    "BlobSection",
    "ReportContext",
    "ReportSectionWarning",
    "Section",
    "blob_section",
    "build_report",
    "figure_png",
    "latest_records",
    "read_table",
    "store_image",
    "store_overlays",
    "store_table",
    "store_token_maps",
]
