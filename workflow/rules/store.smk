# The training store (results/store/): the corpus in the layout the trainer memory-maps (uint16 token ids, int64
# offsets), built by CPU jobs, one per corpus shard, plus an index over them. Every model size trained on this
# corpus opens the same store; the pretraining job never builds it (geneformer_workflow/store.py, docs/training.md).
# STORE_INDEX and get_store_parts are in common.smk.


rule store_shard:
    """One corpus shard in the training layout: train then validation cells, in one pass over its tokens."""
    input:
        parquet="results/tokenized/{dataset}/shard-{shard}.parquet",
        manifest="results/tokenized/{dataset}/shard-{shard}.manifest.json",
        vocab=rules.build_vocabulary.output.vocab,
    output:
        tokens="results/store/{dataset}/shard-{shard}.tokens.npy",
        offsets="results/store/{dataset}/shard-{shard}.offsets.npy",
        manifest="results/store/{dataset}/shard-{shard}.json",
    log:
        "logs/store_shard/{dataset}/shard-{shard}.log",
    benchmark:
        "logs/benchmarks/store_shard/{dataset}/shard-{shard}.tsv"
    conda:
        "../../envs/tokenize.yaml"
    threads: 1
    resources:
        # benchmarks/scale_store.py: peak RSS of one part stays far below this (one 4,096-row batch at a time).
        mem_mb=2000,
        runtime=30,
    params:
        gfw=GFW,
    shell:
        "{params.gfw} store part {input.parquet:q} -o {output.manifest:q} --vocab-dir {input.vocab:q} > {log:q} 2>&1"


rule list_store_parts:
    """The store's parts in corpus order, one per line. The list reaches store_index through this file: a shell
    command is one argument to the shell, and Linux caps one argument at 128 KiB (a few thousand paths)."""
    input:
        get_store_parts,
    output:
        parts="results/store/parts.txt",
    log:
        "logs/list_store_parts/all.log",
    localrule: True
    run:
        Path(output.parts).write_text("".join(f"{part}\n" for part in input))


rule store_index:
    """The store's index: its parts in order, cells and tokens per split, content checksums (paths relative)."""
    input:
        parts=get_store_parts,
        listing=rules.list_store_parts.output.parts,
    output:
        index=STORE_INDEX,
    log:
        "logs/store_index/all.log",
    conda:
        "../../envs/tokenize.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        gfw=GFW,
    shell:
        "{params.gfw} store index --parts-list {input.listing:q} -o {output.index:q} > {log:q} 2>&1"
