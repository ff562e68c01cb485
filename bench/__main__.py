"""``python -m bench [balance | vllm] [options]``: which benchmark to run.

python -m bench                 # the single-backend benchmark against direct and nginx (bench.single)
python -m bench balance         # the balancing strategies on a simulated fleet (bench.balance)
python -m bench vllm            # vLLM's serving benchmark, direct and through (bench.vllm)
python -m bench flow            # flow control on a saturated simulated fleet, against FIFO (bench.flow)
python -m bench tracing         # tracing off, on, and sampled out by the client (bench.tracing)
"""

from __future__ import annotations

import sys


def main() -> None:
    command, argv = (
        (sys.argv[1], sys.argv[2:])
        if sys.argv[1:2] in (["balance"], ["vllm"], ["flow"], ["tracing"])
        else (None, sys.argv[1:])
    )
    if command == "balance":
        from bench import balance

        balance.main(argv)
    elif command == "flow":
        from bench import flow

        flow.main(argv)
    elif command == "tracing":
        from bench import tracing

        tracing.main(argv)
    elif command == "vllm":
        from bench import vllm

        vllm.main(argv)
    else:
        from bench import single

        single.main(argv)


if __name__ == "__main__":
    main()
