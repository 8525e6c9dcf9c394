"""Every supported source behind one spec: which files it reads and how to ingest it.

Formats:

==============  ===========================================================================
``amazon2014``  folder with ``reviews_<Cat>[_5].json.gz`` + ``meta_<Cat>.json.gz`` (Python-literal meta)
``amazon2018``  folder with ``<Cat>[_5].json.gz`` + ``meta_<Cat>.json.gz``
``amazon2023``  folder with ``<Cat>.jsonl.gz`` + ``meta_<Cat>.jsonl.gz``
``interactions``  CSV/Parquet file (user, item, domain, timestamp) + optional items file
``c2dsr``       a C2DSR release folder (split kept as released)
``llmcdsr``     an LLMCDSR release folder (split kept as released)
==============  ===========================================================================

``domains`` names the two domains: the two category names for Amazon folders (domain
A first), the two ``domain`` values of an interactions file, display names for
releases (default: taken from the folder name, e.g. ``llmcdsr-food-kitchen``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import schema
from .ingest import IngestReport, SourceError

FORMATS = ("amazon2014", "amazon2018", "amazon2023", "interactions", "c2dsr", "llmcdsr")
AMAZON_FORMATS = FORMATS[:3]
RELEASE_FILES = {
    "llmcdsr": ("num.txt", "items.tsv", "train_overlap.txt", "train_A.txt", "train_B.txt", "valid.txt", "test.txt"),
    "c2dsr": (
        "Alist.txt",
        "Blist.txt",
        "userlist.txt",
        "items_with_titles.tsv",
        "traindata_new.txt",
        "validdata_new.txt",
        "testdata_new.txt",
    ),
}
DEMO_DATASET = "llmcdsr-food-kitchen-sample"
# Amazon's category names: the LLM stages put the domain name in their prompts, and
# SmolLM2 lists kitchen tags for "Home and Kitchen" but food tags for "Kitchen".
DEMO_DOMAINS = ("Grocery and Gourmet Food", "Home and Kitchen")


def demo_data_dir() -> Path:
    """The bundled demo sample (LLMCDSR format), cut by ``scripts/make_demo_data.py``."""
    return Path(str(resources.files("cdsr_pipeline") / "demo_data" / DEMO_DATASET))


@dataclass(frozen=True)
class SourceSpec:
    format: str
    path: Path
    domains: tuple[str, str] | None = None
    items_path: Path | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SourceError(f"unknown source format {self.format!r} for {self.path}; expected one of {', '.join(FORMATS)}")
        object.__setattr__(self, "path", Path(self.path).expanduser())
        if self.items_path is not None:
            object.__setattr__(self, "items_path", Path(self.items_path).expanduser())
        if self.domains is not None:
            if len(self.domains) != 2 or len(set(self.domains)) != 2:
                raise SourceError(f"domains must be two distinct names, got {list(self.domains)}")
            object.__setattr__(self, "domains", tuple(self.domains))
        if not self.path.exists():
            raise SourceError(f"{self.format} source not found: {self.path}")
        if self.format == "interactions" and not self.path.is_file():
            raise SourceError(f"interactions source must be a CSV or Parquet file: {self.path}")
        if self.format != "interactions" and not self.path.is_dir():
            raise SourceError(f"{self.format} source must be a folder: {self.path}")

    @property
    def dataset(self) -> str:
        """A name for reports: the folder (or file) name."""
        return self.path.stem if self.format == "interactions" else self.path.resolve().name

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "path": str(self.path.resolve()),
            "domains": list(self.domains) if self.domains else None,
            "items_path": str(self.items_path.resolve()) if self.items_path else None,
        }


def demo_source(domains: tuple[str, str] | None = None) -> SourceSpec:
    """The bundled demo sample: Amazon Grocery & Gourmet Food (A) and Home & Kitchen (B)."""
    return SourceSpec(format="llmcdsr", path=demo_data_dir(), domains=domains or DEMO_DOMAINS)


def source_files(spec: SourceSpec) -> list[Path]:
    """The input files a source reads (their content hashes fingerprint the ingest)."""
    if spec.format in RELEASE_FILES:
        return [spec.path / name for name in RELEASE_FILES[spec.format] if (spec.path / name).is_file()]
    if spec.format == "interactions":
        return [spec.path] + ([spec.items_path] if spec.items_path else [])
    from .readers.amazon import discover_amazon_files

    reviews, meta, _ = discover_amazon_files(spec.format, spec.path, spec.domains)
    return [p for letter in schema.DOMAINS for p in (reviews[letter], meta.get(letter)) if p is not None]


def ingest_source(spec: SourceSpec, out_dir: Path, temp_dir: Path | None = None) -> IngestReport:
    """Read ``spec`` into ``interactions.parquet``, ``items.parquet`` and ``quarantine.parquet``."""
    if spec.format == "llmcdsr":
        from .readers.releases import ingest_llmcdsr

        return ingest_llmcdsr(spec.path, out_dir, spec.domains)
    if spec.format == "c2dsr":
        from .readers.releases import ingest_c2dsr

        return ingest_c2dsr(spec.path, out_dir, spec.domains)
    if spec.format == "interactions":
        from .readers.interactions_file import ingest_interactions_file

        return ingest_interactions_file(spec.path, spec.items_path, out_dir, spec.domains)
    from .readers.amazon import discover_amazon_files, ingest_amazon

    reviews, meta, names = discover_amazon_files(spec.format, spec.path, spec.domains)
    return ingest_amazon(spec.format, reviews, meta, out_dir, names, temp_dir=temp_dir)
