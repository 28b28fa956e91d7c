/*
 * Parameter and samplesheet checks against the pipeline's JSON schemas, without a plugin.
 *
 * nextflow_schema.json (parameters) and assets/schema_input.json (samplesheet rows) stay valid JSON
 * Schema documents for launch UIs; this file checks the subset of their keywords they use: type,
 * enum, pattern, minimum/maximum, exclusiveMinimum/exclusiveMaximum, required, format (file-path,
 * directory-path, path) with exists, and the samplesheet's uniqueEntries. Plugins come from a registry
 * at run time, which offline sites and air-gapped cluster nodes cannot reach.
 */

// ---------------------------------------------------------------------------- schema access

def readJson(path) {
    return new groovy.json.JsonSlurper().parse(file(path, checkIfExists: true).toFile())
}

// [name: definition] over every group of the parameter schema, in schema order
def schemaParameters(schema) {
    def found = [:]
    schema.get('$defs', [:]).each { _group, definition ->
        definition.get('properties', [:]).each { name, spec -> found[name] = spec }
    }
    schema.get('properties', [:]).each { name, spec -> found[name] = spec }
    return found
}

def schemaRequired(schema) {
    def required = [] + schema.get('required', [])
    schema.get('$defs', [:]).each { _group, definition -> required += definition.get('required', []) }
    return required.unique()
}

// ---------------------------------------------------------------------------- value checks

def isRemote(value) {
    return value.toString() ==~ /^[a-z][a-z0-9+.-]*:\/\/.*/
}

def matchesType(expected, value) {
    def text = value.toString()
    if (expected == 'integer') {
        return value instanceof Integer || value instanceof Long || value instanceof BigInteger || text ==~ /^-?\d+$/
    }
    if (expected == 'number') {
        return value instanceof Number || text.isNumber()
    }
    if (expected == 'boolean') {
        return value instanceof Boolean || text in ['true', 'false']
    }
    if (expected == 'string') {
        // a flag given without a value arrives as `true`
        return !(value instanceof Boolean)
    }
    return expected == 'null' ? value == null : true
}

def typeProblem(spec, value) {
    def type = spec.get('type', 'string')
    def types = type instanceof List ? type : [type]
    if (types.any { expected -> matchesType(expected, value) }) {
        return null
    }
    if (value == true && 'string' in types) {
        return "given without a value"
    }
    return "'${value}' is not ${types.collect { expected -> expected == 'integer' ? 'an integer' : "a ${expected}" }.join(' or ')}"
}

def valueProblem(spec, value, baseDir) {
    def problem = typeProblem(spec, value)
    if (problem) {
        return problem
    }
    def text = value.toString()
    if (spec.containsKey('enum') && !(spec.get('enum').collect { option -> option.toString() }.contains(text))) {
        return "'${text}' is not one of ${spec.get('enum').join(', ')}"
    }
    if (spec.containsKey('pattern') && !(text ==~ spec.get('pattern'))) {
        return spec.get('errorMessage') ?: "'${text}' does not match ${spec.get('pattern')}"
    }
    if (spec.get('type') in ['integer', 'number']) {
        def number = text.toBigDecimal()
        if (spec.containsKey('minimum') && number < spec.get('minimum')) {
            return "${text} is below the minimum ${spec.get('minimum')}"
        }
        if (spec.containsKey('maximum') && number > spec.get('maximum')) {
            return "${text} is above the maximum ${spec.get('maximum')}"
        }
        if (spec.containsKey('exclusiveMinimum') && number <= spec.get('exclusiveMinimum')) {
            return "${text} must be greater than ${spec.get('exclusiveMinimum')}"
        }
        if (spec.containsKey('exclusiveMaximum') && number >= spec.get('exclusiveMaximum')) {
            return "${text} must be less than ${spec.get('exclusiveMaximum')}"
        }
    }
    if (spec.get('exists') && spec.get('format') in ['file-path', 'directory-path', 'path'] && !isRemote(text)) {
        def path = text.startsWith('/') ? file(text) : file("${baseDir}/${text}")
        if (!path.exists()) {
            return "${text} does not exist"
        }
        if (spec.get('format') == 'file-path' && path.isDirectory()) {
            return "${text} is a directory, not a file"
        }
        if (spec.get('format') == 'directory-path' && !path.isDirectory()) {
            return "${text} is not a directory"
        }
    }
    return null
}

// Nextflow adds a camelCase twin for every --kebab-case parameter given on the command line
def canonicalName(name) {
    return name.replaceAll(/([A-Z])/) { _match, letter -> "_${letter.toLowerCase()}" }.replace('-', '_')
}

def editDistance(a, b) {
    def previous = (0..b.length()).toList()
    a.eachWithIndex { ca, i ->
        def current = [i + 1]
        b.eachWithIndex { cb, j -> current << [previous[j + 1] + 1, current[j] + 1, previous[j] + (ca == cb ? 0 : 1)].min() }
        previous = current
    }
    return previous[b.length()]
}

def closestName(name, candidates) {
    def best = candidates.min { candidate -> editDistance(name, candidate) }
    return best != null && editDistance(name, best) <= Math.max(2, name.length().intdiv(3)) ? best : null
}

/*
 * Every problem with `params` as one line each: unknown parameters (with the closest known name),
 * missing required ones, wrong types, values outside an enum or range, missing files.
 */
def parameterProblems(schema, parameters, baseDir) {
    def known = schemaParameters(schema)
    def problems = []
    parameters.keySet().each { name ->
        def canonical = canonicalName(name.toString())
        if (!known.containsKey(name) && !known.containsKey(canonical)) {
            def guess = closestName(canonical, known.keySet())
            problems << "unknown parameter --${name}${guess ? " (did you mean --${guess}?)" : ''}"
        }
    }
    schemaRequired(schema).each { name ->
        if (parameters.get(name) == null || parameters.get(name).toString() == '') {
            problems << "--${name} is required: ${known.get(name)?.get('description') ?: 'see --help'}"
        }
    }
    known.each { name, spec ->
        def value = parameters.get(name)
        if (value == null) {
            return
        }
        def problem = valueProblem(spec, value, baseDir)
        if (problem) {
            problems << "--${name}: ${problem}"
        }
    }
    return problems
}

// ---------------------------------------------------------------------------- help and summary

def helpText(schema, command, onlyParameter) {
    def known = schemaParameters(schema)
    if (onlyParameter) {
        def spec = known.get(onlyParameter)
        if (spec == null) {
            return "unknown parameter --${onlyParameter}; `--help` lists them all"
        }
        def lines = ["--${onlyParameter}", "    ${spec.description ?: ''}"]
        ['type', 'default', 'enum', 'minimum', 'maximum', 'format', 'pattern'].each { key ->
            if (spec.containsKey(key)) {
                lines << "    ${key}: ${spec[key] instanceof List ? spec[key].join(', ') : spec[key]}"
            }
        }
        if (spec.help_text) {
            lines << "" << "    ${spec.help_text}"
        }
        return lines.join('\n')
    }
    def width = known.keySet().collect { name -> name.length() }.max() + 4
    def lines = ["Usage:", "  ${command}", ""]
    schema.get('$defs', [:]).each { _group, definition ->
        def visible = definition.get('properties', [:]).findAll { _name, spec -> !spec.get('hidden') }
        if (!visible) {
            return
        }
        lines << "${definition.title ?: _group}:"
        visible.each { name, spec ->
            def type = spec.get('enum') ? spec.get('enum').join('|') : spec.get('type', 'string')
            def fallback = spec.containsKey('default') ? " (default: ${spec.get('default')})" : ''
            lines << "  ${"--${name}".padRight(width)} [${type}] ${spec.description ?: ''}${fallback}"
        }
        lines << ''
    }
    lines << "`--help <parameter>` shows one parameter in full; hidden parameters are in nextflow_schema.json."
    return lines.join('\n')
}

// the parameters that differ from the schema's defaults, by group
def parameterSummary(schema, parameters) {
    def lines = []
    schema.get('$defs', [:]).each { _group, definition ->
        def changed = definition.get('properties', [:]).findAll { name, spec ->
            def value = parameters.get(name)
            value != null && value.toString() != spec.get('default', '').toString()
        }
        if (changed) {
            lines << "${definition.title ?: _group}:"
            changed.each { name, _spec -> lines << "  ${name.padRight(24)}: ${parameters.get(name)}" }
        }
    }
    return lines.join('\n')
}

// ---------------------------------------------------------------------------- samplesheet

/*
 * The samplesheet's rows as [meta, path] with paths resolved against the sheet's folder, checked
 * against its schema: known columns only, required values, patterns, existing files and unique
 * sample ids. Quoted fields and a UTF-8 byte-order mark are read as CSV allows. Every problem is
 * reported on its own line; none of them lets the pipeline start.
 */
def readSamplesheet(sheetPath, schemaPath) {
    def sheet = file(sheetPath, checkIfExists: true)
    def schema = readJson(schemaPath)
    def columns = schema.items.properties
    def required = schema.items.get('required', [])
    def rows = sheet.splitCsv(header: true, quote: '"', strip: true)
    def problems = []
    if (rows.isEmpty()) {
        problems << "${sheet}: no samples (a header line and at least one row are needed)"
        return [rows: [], problems: problems]
    }
    def header = rows[0].keySet().collect { name -> name.toString().replace('\uFEFF', '').trim() }
    def unknown = header.findAll { name -> !columns.containsKey(name) }
    if (unknown) {
        problems << "${sheet}: unknown column(s) ${unknown.join(', ')}; the columns are ${columns.keySet().join(', ')}"
    }
    required.findAll { name -> !(name in header) }.each { name -> problems << "${sheet}: missing column '${name}'" }
    if (problems) {
        return [rows: [], problems: problems]
    }
    def samples = []
    def seen = [:]
    rows.eachWithIndex { raw, index ->
        def line = index + 2
        def row = raw.collectEntries { key, value -> [(key.toString().replace('\uFEFF', '').trim()), value == null ? '' : value.toString()] }
        columns.each { name, spec ->
            def value = row.get(name, '')
            if (value == '') {
                if (name in required) {
                    problems << "${sheet} line ${line}: no ${name}"
                }
                return
            }
            def problem = valueProblem(spec, value, sheet.parent)
            if (problem) {
                problems << "${sheet} line ${line}: ${name} '${value}': ${problem}"
            }
        }
        def id = row.get('sample', '')
        if (id && seen.containsKey(id)) {
            problems << "${sheet} line ${line}: sample '${id}' is also on line ${seen[id]}; sample ids must be unique"
        }
        seen[id] = line
        def counts = row.path ? (row.path.startsWith('/') || isRemote(row.path) ? file(row.path) : sheet.parent.resolve(row.path)) : null
        def meta = [id: id, batch: row.get('batch') ?: id, condition: row.get('condition') ?: null]
        samples << [meta, counts]
    }
    return [rows: samples, problems: problems]
}
