#!/usr/bin/env nextflow
/*
 * scfm: single-cell foundation model pipeline.
 *
 *   nextflow run . -profile test,docker --outdir results
 *   nextflow run . -profile slurm,gpu,apptainer --input samplesheet.csv --outdir results \
 *       --mode embed --checkpoint /models/scfm-base
 *
 * Every process is a thin call of a `bin/scfm-<step>` command; see docs/pipeline.md.
 */

include { validateParameters; samplesheetToList } from 'plugin/nf-schema'
include { SCFM } from './workflows/scfm'

workflow {
    main:
    validateParameters()
    checkModeParams()

    // samplesheet rows -> [ meta (id, batch, condition), counts ]; a sample without a batch is its own batch
    def rows = samplesheetToList(withAbsolutePaths(params.input), "${projectDir}/assets/schema_input.json")
        .collect { meta, counts -> [meta + [batch: meta.batch ?: meta.id], counts] }
    // --finetune_sample a,b restricts fine-tuning to those samples; unset, every sample is used
    def finetune_samples = params.finetune_sample ? params.finetune_sample.toString().tokenize(',').collect { id -> id.trim() } : []
    def sample_ids = rows.collect { row -> row[0].id }
    def unknown = finetune_samples.findAll { id -> !(id in sample_ids) }
    if (unknown) {
        error("--finetune_sample ${unknown.join(',')} is not a sample of ${params.input}")
    }

    // SQLite needs an absolute path: tasks run in their own work directories
    def mlflow_uri = params.mlflow_uri ?: "sqlite:///${file(params.outdir).toAbsolutePath()}/mlflow/mlflow.db"

    SCFM(channel.fromList(rows), mlflow_uri, finetune_samples)

    // one entry per process, however many tasks it ran
    SCFM.out.versions
        .map { versions -> versions.text.trim() }
        .unique()
        .collectFile(name: 'scfm_software_versions.yml', storeDir: "${params.outdir}/pipeline_info", sort: true, newLine: true)

    workflow.onComplete = {
        log.info("scfm ${workflow.success ? 'finished' : 'failed'}: results in ${params.outdir}, MLflow store ${mlflow_uri}")
    }
}

// A copy of the samplesheet whose relative paths are made relative to the sheet itself, as `scfm`
// reads samplesheets (nf-schema would resolve them against the launch directory).
def withAbsolutePaths(sheet) {
    def source = file(sheet, checkIfExists: true)
    def lines = source.readLines().findAll { line -> line.trim() }
    def column = lines[0].split(',', -1).toList().indexOf('path')
    if (column < 0) {
        return source
    }
    def rows = lines.drop(1).collect { line ->
        def fields = line.split(',', -1).toList()
        def path = fields.size() > column ? fields[column].trim() : ''
        if (path && !path.startsWith('/') && !path.contains('://')) {
            fields[column] = source.parent.resolve(path).toString()
        }
        fields.join(',')
    }
    def resolved = file("${workflow.workDir}/samplesheet.${workflow.sessionId}.csv")
    resolved.text = ([lines[0]] + rows).join('\n') + '\n'
    return resolved
}

// Flag combinations the JSON schema cannot express.
def checkModeParams() {
    if (params.mode in ['embed', 'finetune'] && !params.checkpoint) {
        error("--mode ${params.mode} needs --checkpoint (a checkpoint directory or the official models.ckpt)")
    }
    if (params.mode == 'finetune' && !params.label_key) {
        error("--mode finetune needs --label_key: the obs column holding the cell-type labels")
    }
    if (params.reference && !params.label_key) {
        error("--reference needs --label_key: the obs column of the reference holding its labels")
    }
    if (params.checkpoint && !params.vocab && params.mode != 'pretrain' && params.checkpoint.toString().endsWith('.ckpt')) {
        error("--checkpoint ${params.checkpoint} has no vocabulary inside: give --vocab (e.g. OS_scRNA_gene_index.19264.tsv)")
    }
    if ((params.tf_list || params.go_db || params.gene_modules_groupby) && !params.gene_modules) {
        error("--tf_list, --go_db and --gene_modules_groupby take effect with --gene_modules")
    }
}
