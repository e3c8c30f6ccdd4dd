"""The bad-input policy: every way an input can be unusable, and what happens then.

Before training (and in `python -m scripts.inspect_data`), every listed entry is checked: its caption is
read and its video opened, its frame count and timing read, its first and last frame decoded.
Entries that fail are rejected and counted by reason; the run prints the counts and logs them to
W&B, and stops at start only if nothing is usable.

During training a clip can still fail to decode (damage in the middle of a file). With
`data.on_error=skip` (the default) that sample is replaced by the next clip of the same bucket,
so the batch keeps its size and every process its step count; the failure is counted by reason,
logged, and summarized at the end. With `data.on_error=raise` the run stops with the file's name.
"""

from __future__ import annotations

from collections import Counter

REASONS = {
    "missing_file": "named by the metadata but not on disk",
    "empty_file": "zero bytes",
    "unreadable": "not a video decord can open (corrupt header, unknown container or codec)",
    "truncated": "opens, but frames cannot be decoded (cut short, damaged)",
    "too_short": "shorter than the smallest clip (frames at the target fps)",
    "missing_caption": "no caption (.txt beside the video, or the metadata's caption field)",
    "empty_caption": "the caption is empty or only whitespace",
    "caption_not_utf8": "the caption file is not UTF-8 text",
    "bad_metadata_row": "a metadata line that is not valid JSON or has no video path",
    "caption_unreadable": "the caption cannot be read (no permission, a folder named .txt, an I/O error)",
    "not_a_file": "a folder (or other non-file) with a video's name",
    "broken_link": "a symbolic link whose target does not exist",
    "duplicate": "the same video listed again in one dataset (the first listing is kept)",
}
# Problems of the listing itself: rejected before the video is opened.
LISTING_PROBLEMS = ("bad_metadata_row", "not_a_file", "broken_link", "duplicate")


class RejectCounts(Counter):
    """Counts of rejected inputs by reason (only reasons from REASONS)."""

    def add(self, reason: str, n: int = 1) -> None:
        if reason not in REASONS:
            raise KeyError(f"unknown reject reason {reason!r}")
        self[reason] += n

    def summary(self) -> str:
        """One line: '4 (3 truncated, 1 missing_caption)', or 'none'."""
        if not self:
            return "none"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.most_common())
        return f"{sum(self.values())} ({parts})"
