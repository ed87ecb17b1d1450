rule summarize_expression:
    """Mergeable per-file histogram of normalised expression per gene (for the gene medians)."""
    input:
        h5ad=get_h5ad,
        cells=rules.qc_dataset.output.cells,
    output:
        summary="results/medians/{dataset}.npz",
    log:
        "logs/summarize_expression/{dataset}.log",
    params:
        gfw=GFW,
        # = medians.FORMAT_VERSION: a new summary format is a params change, so Snakemake remakes old summaries.
        summary_format=2,
        options=input_options(),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/tokenize.yaml"
    shell:
        "{params.gfw} summarize {input.h5ad:q} -o {output.summary:q} --cell-filter {input.cells:q} {params.options} > {log:q} 2>&1"


rule compute_gene_medians:
    """Merge the per-file summaries into one gene median table (order-independent)."""
    input:
        summaries=expand(rules.summarize_expression.output.summary, dataset=DATASETS),
    output:
        medians="results/reference/gene_medians.tsv",
    log:
        "logs/compute_gene_medians/all.log",
    params:
        gfw=GFW,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/tokenize.yaml"
    shell:
        "{params.gfw} medians {input.summaries:q} -o {output.medians:q} > {log:q} 2>&1"


rule build_vocabulary:
    """Token dictionary (Geneformer's convention) and Hugging Face tokenizer directory."""
    input:
        medians=get_gene_medians(),
    output:
        vocab=directory("results/reference/vocab"),
    log:
        "logs/build_vocabulary/all.log",
    params:
        gfw=GFW,
        preset=lookup(dpath="tokenize/preset", within=config),
        existing=existing_dictionary_option(),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/tokenize.yaml"
    shell:
        "{params.gfw} vocab {input.medians:q} -o {output.vocab:q} --preset {params.preset} {params.existing} > {log:q} 2>&1"
