rule tokenize_dataset:
    """Rank-value tokens of the kept cells of one shard (row range) of a file: parquet + lengths + manifest; then the
    same shard in the training store's layout (store.smk), one pass over its tokens, train then validation cells.

    One job per shard for both, since planning costs Snakemake about 1-2 ms per job (10,000 inputs: docs/scale.md).
    """
    input:
        h5ad=get_h5ad,
        cells=rules.qc_dataset.output.cells,
        vocab=rules.build_vocabulary.output.vocab,
        medians=get_gene_medians(),
    output:
        parquet="results/tokenized/{dataset}/shard-{shard}.parquet",
        lengths="results/tokenized/{dataset}/shard-{shard}.lengths.npy",
        lengths_pkl="results/tokenized/{dataset}/shard-{shard}.lengths.pkl",
        manifest="results/tokenized/{dataset}/shard-{shard}.manifest.json",
        store_tokens="results/store/{dataset}/shard-{shard}.tokens.npy",
        store_offsets="results/store/{dataset}/shard-{shard}.offsets.npy",
        store_part="results/store/{dataset}/shard-{shard}.json",
    log:
        "logs/tokenize_dataset/{dataset}/shard-{shard}.log",
    benchmark:
        "logs/benchmarks/tokenize_dataset/{dataset}/shard-{shard}.tsv"
    conda:
        "../../envs/tokenize.yaml"
    threads: 1
    resources:
        # tokenization, then the store part (benchmarks/scale_store.py: under 0.5 GB, one 4,096-row batch at a time)
        mem_mb=4000,
        runtime=150,
    params:
        gfw=GFW,
        options=input_options(),
        preset=lookup(dpath="tokenize/preset", within=config),
        obs_columns=obs_columns_option(),
        validation_fraction=lookup(dpath="tokenize/validation_fraction", within=config),
        rows=get_shard_rows,
        encoding=lookup(dpath="tokenize/parquet_encoding", within=config),
    shell:
        "{params.gfw} tokenize {input.h5ad:q} {output.parquet:q} --token-dictionary {input.vocab:q} "
        "--gene-medians {input.medians:q} --preset {params.preset} --cell-filter {input.cells:q} "
        "{params.obs_columns} --validation-fraction {params.validation_fraction} "
        "{params.rows} --threads {threads} --parquet-encoding {params.encoding} {params.options} > {log:q} 2>&1 && "
        "{params.gfw} store part {output.parquet:q} -o {output.store_part:q} --vocab-dir {input.vocab:q} >> {log:q} 2>&1"


rule index_dataset:
    """The dataset's corpus: its shards in order (dataset.json) and every cell's length in shard order.

    Consumers read exactly these shards: a shard left by an earlier run with another tokenize.shard_cells is
    named in the log and never read.
    """
    input:
        shards=get_dataset_shards,
    output:
        index="results/tokenized/{dataset}/dataset.json",
        lengths="results/tokenized/{dataset}/dataset.lengths.npy",
        lengths_pkl="results/tokenized/{dataset}/dataset.lengths.pkl",
    log:
        "logs/index_dataset/{dataset}.log",
    conda:
        "../../envs/tokenize.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        gfw=GFW,
    shell:
        # The shards reach gfw through a pipe (printf is a shell builtin: no argument limit), not its command line.
        "printf '%s\\n' {input.shards:q} | {params.gfw} index @/dev/stdin -o {output.index:q} > {log:q} 2>&1"


rule list_corpus_datasets:
    """results/tokenized/datasets.txt: the index of each dataset of config 'inputs', one per line, relative to it.

    What `gfw embed`, `gfw hf-dataset`, `gfw store build` and data.corpus take for the whole corpus. A glob over
    results/tokenized/*/dataset.json would also read datasets removed from 'inputs' (their results stay).
    """
    input:
        get_corpus_indexes,
    output:
        listing=CORPUS_LIST,
    log:
        "logs/list_corpus_datasets/all.log",
    localrule: True
    run:
        Path(output.listing).write_text(
            "".join(f"{os.path.relpath(index, Path(output.listing).parent)}\n" for index in input)
        )
