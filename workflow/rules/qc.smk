# The expression summary of a file (for the gene medians) is written by its QC job, in the same pass over the counts
# as QC (gfw qc --expression-summary), unless the config gives gene medians: one job per input instead of two, since
# planning costs Snakemake about 1-2 ms per job (10,000 inputs: docs/scale.md), and one read of each file.
QC_SUMMARIZES = not config["vocabulary"].get("gene_medians")
EXPRESSION_SUMMARY = "results/medians/{dataset}.npz"


rule qc_dataset:
    """Per-cell QC metrics (scanpy) and the filter_pass verdict for one input file and, when the workflow computes
    the gene medians, the file's mergeable histogram of normalised expression per gene over the kept cells, in one
    pass over the file."""
    input:
        h5ad=get_h5ad,
    output:
        **({"expression": EXPRESSION_SUMMARY} if QC_SUMMARIZES else {}),
        cells="results/qc/{dataset}/cells.tsv",
        summary="results/qc/{dataset}/summary.json",
        plot=report(
            "results/qc/{dataset}/qc.png",
            caption="../report/qc.rst",
            category="1. Quality control",
            subcategory="{dataset}",
        ),
    log:
        "logs/qc_dataset/{dataset}.log",
    conda:
        "../../envs/tokenize.yaml"
    threads: 1
    resources:
        # one pass over the file, one chunk of cells at a time (the summary's histogram is bounded by the genes)
        mem_mb=4000,
        runtime=120 if QC_SUMMARIZES else 60,
    params:
        gfw=GFW,
        options=input_options(),
        thresholds=qc_options(),
        # = medians.FORMAT_VERSION: a new summary format is a params change, so Snakemake remakes old summaries.
        summary_format=2,
    shell:
        "{params.gfw} qc {input.h5ad:q} -o {output.cells:q} --summary {output.summary:q} --plot {output.plot:q} "
        + ("--expression-summary {output.expression:q} " if QC_SUMMARIZES else "")
        + "{params.options} {params.thresholds} > {log:q} 2>&1"
