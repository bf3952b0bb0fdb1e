"""Build (or find) the token stores of a job's data without training: on every local core, or with Ray Data
on the cluster that `cluster.address` names. Runs then reuse the stores (same data.* settings and tokenizer).

    python scripts/build_store.py data=text_files data.path=corpus/ data.seq_length=2048 data.store_dir=/shared/stores
    python scripts/build_store.py data=text_files data.path=/shared/corpus cluster.address=head:6379 data.store_dir=/shared/stores

Overrides are run.py's (Hydra). Prints one JSON line per source: its store's path, tokens, samples and
build time (or that it was reused). Exit code 2 on a bad value, as run.py.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tp2d_exp.config.errors import ConfigError  # noqa: E402


def main() -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tp2d_exp.config.schema import compose
    from tp2d_exp.config.spec import JobContext, build_spec
    from tp2d_exp.config.validate import check_config
    from tp2d_exp.driver.prepare import prepare_data

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        with tempfile.TemporaryDirectory() as out:
            spec = build_spec(compose(sys.argv[1:]), JobContext(root=ROOT, output_dir=Path(out)))
            check_config(spec)
            if spec.cluster.address:
                from tp2d_exp.driver import cluster

                cluster.connect_and_check(spec)
            spec = prepare_data(spec)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    for ref in spec.resolved.stores:
        print(json.dumps(asdict(ref)))


if __name__ == "__main__":
    main()
