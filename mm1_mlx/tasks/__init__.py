"""Standard benchmarks for `mm1-mlx eval --task`: VQAv2, TextVQA, DocVQA, MMMU, ScienceQA-IMG,
RefCOCO and ScreenSpot, read from the parquet files their datasets publish on the Hugging Face
hub, prompted and scored as lmms-eval defines each task.

- `metrics`: the metric functions, each after its reference implementation.
- `definitions`: per task, how a parquet row becomes examples and which metric scores them
  (`TASKS`).
- `runner`: streaming the files, asking the model (or reading saved predictions), the resumable
  per-example output and the summary.
"""
