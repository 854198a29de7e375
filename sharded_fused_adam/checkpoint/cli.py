"""``sharded-fused-adam-checkpoint``: inspect or verify a sharded checkpoint, consolidate it into one torch
file, or convert between our formats, DeepSpeed (ZeRO 0-2 and universal) and torch.distributed.checkpoint."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .convert import cli as convert_cli
from .outputs import staged_file, torch_save
from .sharded import CheckpointReader, consolidate_sharded

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="sharded-fused-adam-checkpoint", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print a sharded checkpoint's metadata")
    inspect.add_argument("checkpoint", type=Path)
    verify = sub.add_parser("verify", help="check every file and every data checksum of the newest version")
    verify.add_argument("checkpoint", type=Path)
    conv = sub.add_parser("consolidate", help="write one torch.optim.Adam-layout state dict file")
    conv.add_argument("checkpoint", type=Path)
    conv.add_argument("output", type=Path)
    convert_cli.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            return convert_cli.run(args)
        if args.command == "inspect":
            reader = CheckpointReader(args.checkpoint)
            stepped = sum(1 for p in reader.meta["params"] if p["step"] > 0)
            print(json.dumps({"version_dir": str(reader.folder), "world_size": reader.meta["world_size"],
                              "params": len(reader.meta["params"]), "params_with_state": stepped,
                              "param_groups": len(reader.common["param_groups"])}, indent=2))
        elif args.command == "verify":
            reader = CheckpointReader(args.checkpoint)
            reader.verify_all()
            print(f"ok: {reader.folder} ({len(reader.chunks)} rank files, every checksum matches)")
        else:
            state = consolidate_sharded(args.checkpoint)
            with staged_file(args.output) as tmp:  # see [Note: checkpoint outputs]
                torch_save(state, tmp)
            print(f"wrote {args.output}: {len(state['state'])} param states, "
                  f"{len(state['param_groups'])} param groups")
    except (OSError, RuntimeError, ValueError) as exc:  # CheckpointError is a ValueError; I/O, torch: the others
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
