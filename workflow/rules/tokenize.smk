rule tokenize_dataset:
    """Rank-value tokens of the kept cells of one shard (row range) of a file: parquet + lengths + manifest."""
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
    log:
        "logs/tokenize_dataset/{dataset}/shard-{shard}.log",
    benchmark:
        "logs/benchmarks/tokenize_dataset/{dataset}/shard-{shard}.tsv"
    params:
        gfw=GFW,
        options=input_options(),
        preset=lookup(dpath="tokenize/preset", within=config),
        obs_columns=",".join(config["tokenize"]["obs_columns"]),
        validation_fraction=lookup(dpath="tokenize/validation_fraction", within=config),
        rows=get_shard_rows,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../../envs/tokenize.yaml"
    shell:
        "{params.gfw} tokenize {input.h5ad} {output.parquet} --token-dictionary {input.vocab} "
        "--gene-medians {input.medians} --preset {params.preset} --cell-filter {input.cells} "
        "--obs-columns '{params.obs_columns}' --validation-fraction {params.validation_fraction} "
        "{params.rows} --threads {threads} {params.options} > {log} 2>&1"
