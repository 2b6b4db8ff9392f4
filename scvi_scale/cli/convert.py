"""`scvi-scale convert SOURCE STORE`: an .h5ad file, a 10x folder or an AnnData-Zarr store as our store."""

from __future__ import annotations


def add_commands(commands) -> None:
    p = commands.add_parser("convert", help="write an .h5ad file, a 10x folder or an AnnData-Zarr store as our store")
    p.add_argument("source")
    p.add_argument("store")
    p.add_argument("--chunk-rows", type=int, help="rows per streaming block (default: see write_store)")
    p.add_argument("--layer", help="take counts from this layer of the source instead of X")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STORE (once the new one is whole)")
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from scvi_scale.data import write_store

    options = {"layer": args.layer, "overwrite": args.overwrite}
    if args.chunk_rows:
        options["chunk_rows"] = args.chunk_rows
    write_store(args.source, args.store, **options)
    print(f"wrote {args.store}")
    return 0
