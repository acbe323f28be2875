# Importing mm1_mlx first loads OpenBLAS for MLX on Linux (it must precede `import mlx.core`).
import mm1_mlx  # noqa: F401  isort: skip
import mlx.core as mx
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    mx.random.seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A converted tiny MM1 model folder (CLIP 48px -> C-Abstractor, 4 tokens -> Llama)."""
    from builders import make_clip_vision, make_llm

    from mm1_mlx.convert.assemble import convert_model

    root = tmp_path_factory.mktemp("tiny")
    make_llm(root / "llm", "llama", vocab_size=336)
    make_clip_vision(root / "vision")
    convert_model(
        root / "vision",
        root / "llm",
        root / "model",
        num_image_tokens=4,
        connector_options={"hidden_dim": 32, "depth": 1},
    )
    return root / "model"


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return mm1_mlx.load(tiny_model_dir)


def pytest_terminal_summary(terminalreporter):
    """Skipped browser tests are a gap in what was tested: say so where nobody can miss it."""
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "test_app_browser" in report.nodeid
    ]
    if skipped:
        reason = skipped[0].longrepr[2] if isinstance(skipped[0].longrepr, tuple) else ""
        terminalreporter.write_sep("!", "THE APP'S BROWSER TESTS DID NOT RUN", red=True, bold=True)
        terminalreporter.write_line(f"{len(skipped)} skipped: {reason}", red=True)
