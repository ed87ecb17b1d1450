rule qc_dataset:
    """Per-cell QC metrics (scanpy) and the filter_pass verdict for one input file."""
    input:
        h5ad=get_h5ad,
    output:
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
        mem_mb=4000,
        runtime=60,
    params:
        gfw=GFW,
        options=input_options(),
        thresholds=qc_options(),
    shell:
        "{params.gfw} qc {input.h5ad:q} -o {output.cells:q} --summary {output.summary:q} --plot {output.plot:q} "
        "{params.options} {params.thresholds} > {log:q} 2>&1"
