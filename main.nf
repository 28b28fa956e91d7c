#!/usr/bin/env nextflow
/*
 * scfm: single-cell foundation model pipeline.
 *
 *   nextflow run . -profile test,local --outdir results
 *   nextflow run . -profile slurm,gpu,apptainer --input samplesheet.csv --outdir results \
 *       --mode embed --checkpoint /models/scfm-base
 *
 * Every process is a thin call of a `bin/scfm-<step>` command; see docs/usage.md. No plugin is used:
 * parameters and the samplesheet are checked against their JSON schemas by
 * subworkflows/local/utils_schema, so the pipeline runs offline (NXF_OFFLINE=true).
 */

include { PIPELINE_INITIALISATION; PIPELINE_COMPLETION; finetuneSamples } from './subworkflows/local/utils_scfm_pipeline'
include { SCFM } from './workflows/scfm'

workflow {
    main:
    PIPELINE_INITIALISATION()

    // nextflow.config resolves the default store (sqlite under --outdir) and exports it to every task
    def mlflow_uri = params.mlflow_uri

    SCFM(PIPELINE_INITIALISATION.out.samples, finetuneSamples())

    // one entry per process, however many tasks it ran
    SCFM.out.versions
        .map { versions -> versions.text.trim() }
        .unique()
        .collectFile(name: 'scfm_software_versions.yml', storeDir: "${params.outdir}/pipeline_info", sort: true, newLine: true)

    PIPELINE_COMPLETION(mlflow_uri)
}
