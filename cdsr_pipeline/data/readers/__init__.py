"""Readers of the raw formats a source can come in, each to the normalized tables of
``data.schema`` (interactions, items, quarantine): the Amazon review dumps (2014, 2018,
2023), an interactions CSV/parquet with an optional item table, and the released
splits (LLMCDSR, C2DSR). ``data.sources`` picks the reader of a source."""
