"""Anonymisation (``--anonymize``): no patient name, ID or date from a DICOM header reaches any output.

* Names: a DICOM image is named by its SOP Instance UID (:func:`pseudonym`), any other file by its path with the
  patient values scrubbed (:func:`anonymous_name`): clinic exports often name folders after the patient.
* Free text bound for an output (paths, error reasons, passed-over entries, ``run.json``) goes through
  :func:`scrub_text` with the values :func:`phi_values` lists for every header of the study.
* Rows keep their join keys (frame and UIDs) and leave the patient columns empty (:func:`patient_columns`).

Every function here is pure.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, TypeVar

from .decode import DicomIdentifiers, PatientInfo

#: Shorter name parts and identifiers are not scrubbed from free text: "LI" or "7" would mangle everything.
MIN_SCRUB_LENGTH = 3
REDACTED = "[removed]"


#: Separators a date is written with between its parts (none: 20190417, 17042019).
_DATE_SEPARATORS = ("", "-", ".", "/", "_", " ")


# ----------------------------------------------------------------------------------------------------------
# Names


def pseudonym(identifiers: DicomIdentifiers, fallback: str) -> str:
    """The name an image gets under ``--anonymize`` instead of its path (folder names often name the patient).

    The SOP Instance UID when there is one (it is the join key anyway), else a hash of ``fallback``.
    """
    if identifiers.sop_uid and re.fullmatch(r"[0-9.]{1,64}", identifiers.sop_uid):
        return identifiers.sop_uid
    return "dicom-" + hashlib.sha256(fallback.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def anonymous_name(rel: str, phi: frozenset[str], is_dicom: bool, identifiers: DicomIdentifiers | None) -> str:
    """The name a file's items get under ``--anonymize`` instead of ``rel``: a DICOM file's :func:`pseudonym`
    (``identifiers`` is None when its header could not be read), any other path with ``phi`` scrubbed."""
    if is_dicom:
        return pseudonym(identifiers or DicomIdentifiers(), rel)
    return scrub_text(rel, phi)


# ----------------------------------------------------------------------------------------------------------
# Scrubbing free text


def _date_forms(value: str) -> list[str]:
    """A DICOM date (YYYYMMDD, or the date part of a DT) and the usual ways it is spelled elsewhere: year first,
    day first or month first, with any of ``_DATE_SEPARATORS`` (2019-04-17, 17.04.2019, 04/17/2019, 17042019...)."""
    digits = value[:8]
    if not re.fullmatch(r"\d{8}", digits):
        return [value] if len(value) >= MIN_SCRUB_LENGTH else []
    y, m, d = digits[:4], digits[4:6], digits[6:]
    return [sep.join(parts) for sep in _DATE_SEPARATORS for parts in ((y, m, d), (d, m, y), (m, d, y))]


def phi_values(patient: PatientInfo) -> frozenset[str]:
    """Strings that must not appear in any output under ``--anonymize``: name (whole and each part), IDs, dates."""
    values: set[str] = set()
    if patient.name:
        values.add(patient.name.strip("^ "))
        values.update(part for part in re.split(r"[\^=\s,]+", patient.name) if part)
    values.update(v for v in (patient.patient_id, patient.accession_number, *patient.other_ids) if v)
    for date in (patient.study_date, *patient.dates):
        if date:
            values.update(_date_forms(date))
    return frozenset(v for v in values if len(v) >= MIN_SCRUB_LENGTH)


def scrub_text(text: str, values: frozenset[str] | set[str]) -> str:
    """``text`` with every occurrence of ``values``, case-insensitive and wherever it stands (glued to letters or
    digits too: ``DoeJane_PID73921x``), replaced by ``[removed]``.

    One pass, longest values first, so no value is left in what was there: a name in any order of its parts
    (each part is a value), an ID inside a longer token, a date in any spelling :func:`phi_values` lists. The price:
    a name part also goes where it is part of an ordinary word (a surname "Ann" out of "annotation"). The only
    text the result can show that matches a value is the word ``removed`` of the marker itself.
    """
    if not values or not text:
        return text
    pattern = "|".join(re.escape(v) for v in sorted(values, key=lambda v: (-len(v), v)))
    return re.sub(pattern, REDACTED, text, flags=re.IGNORECASE)


@dataclass
class Scrubber:
    """Collects the patient values of every DICOM object seen in a run and removes them from output text."""

    values: set[str] = field(default_factory=set)

    def add(self, patient: PatientInfo) -> None:
        self.values.update(phi_values(patient))

    def __call__(self, text: str) -> str:
        return scrub_text(text, self.values)


# ----------------------------------------------------------------------------------------------------------
# Rows


def patient_columns(patient: PatientInfo, anonymize: bool) -> dict[str, str]:
    """A row's ``patient_id`` and ``study_date``: from the header, or empty under ``--anonymize``."""
    return {
        "patient_id": "" if anonymize else patient.patient_id,
        "study_date": "" if anonymize else patient.study_date,
    }


class _Row(Protocol):
    """What :func:`scrub_row` needs of a row: a dataclass (:class:`busi_batch.records.ImageResult`) with these texts."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def error(self) -> str: ...

    @property
    def truth_error(self) -> str: ...


RowT = TypeVar("RowT", bound=_Row)


def scrub_row(row: RowT, scrub: Callable[[str], str]) -> RowT:
    """A copy of ``row`` with its free texts (error reasons may quote a file name) passed through ``scrub``."""
    return replace(row, error=scrub(row.error), truth_error=scrub(row.truth_error))
