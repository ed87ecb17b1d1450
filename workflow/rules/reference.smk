rule list_expression_summaries:
    """The per-file summaries, one path per line: compute_gene_medians reads its inputs from this file.

    A list of thousands of paths does not fit one command line (Linux caps an argument at 128 KiB), and a
    medians job with thousands of inputs, which every tokenize job depends on, makes Snakemake's planning
    quadratic in the number of inputs (docs/scale.md).
    """
    input:
        summaries=expand(EXPRESSION_SUMMARY, dataset=DATASETS),  # written by qc_dataset (qc.smk)
    output:
        listing="results/medians/summaries.txt",
    log:
        "logs/list_expression_summaries/all.log",  # stays empty: nothing to report (snakemake --lint wants one)
    localrule: True
    run:
        Path(output.listing).write_text("".join(f"{path}\n" for path in input.summaries))


rule compute_gene_medians:
    """Merge the per-file summaries into one gene median table (order-independent, streamed: one summary in memory)."""
    input:
        summaries=rules.list_expression_summaries.output.listing,
    output:
        medians="results/reference/gene_medians.tsv",
    log:
        "logs/compute_gene_medians/all.log",
    conda:
        "../../envs/tokenize.yaml"
    threads: 1
    resources:
        # Measured (benchmarks/scale.py, docs/scale.md): peak RSS 451 MB at 2,000 and 454 MB at 10,000 summaries of
        # 16,576 genes (it does not grow with the number of files), 950 MB for a 60,000-gene union.
        mem_mb=2000,
        runtime=60,
    params:
        gfw=GFW,
    shell:
        "{params.gfw} medians --inputs-from {input.summaries:q} -o {output.medians:q} > {log:q} 2>&1"


rule build_vocabulary:
    """Token dictionary (Geneformer's convention) and Hugging Face tokenizer directory."""
    input:
        medians=get_gene_medians(),
    output:
        vocab=directory("results/reference/vocab"),
    log:
        "logs/build_vocabulary/all.log",
    conda:
        "../../envs/tokenize.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        gfw=GFW,
        preset=lookup(dpath="tokenize/preset", within=config),
        existing=existing_dictionary_option(),
    shell:
        "{params.gfw} vocab {input.medians:q} -o {output.vocab:q} --preset {params.preset} {params.existing} > {log:q} 2>&1"
