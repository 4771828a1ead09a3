// What the JavaScript driver programs share: the scenario the test sends on stdin and the SQL each
// step runs (the same for every driver, so the test module checks every driver against one contract).

export const SQL = {
  plain: (model, text) => `SELECT azure_local_ai.create_embeddings('${model}', '${text.replaceAll("'", "''")}') AS e`,
  param: 'SELECT azure_local_ai.create_embeddings($1, $2) AS e',
  withIds: 'SELECT id, embedding FROM azure_local_ai.create_embeddings($1, $2::text[], $3::bigint[])',
  docsTable: 'CREATE TEMP TABLE docs (body text, v vector(384))',
  insertDoc: 'INSERT INTO docs VALUES ($2, azure_local_ai.create_embeddings($1, $2)::vector)',
  nearest: 'SELECT body, v <=> azure_local_ai.create_embeddings($1, $2)::vector AS distance FROM docs ORDER BY 2',
  settings: 'SELECT azure_local_ai.get_setting() AS s',
  setting: 'SELECT azure_local_ai.get_setting($1) AS s',
  metadata: 'SELECT azure_local_ai.model_metadata($1) AS m',
  batchTable: 'CREATE TEMP TABLE batch_rows (id bigint PRIMARY KEY, v vector(384))',
  batchInsert: 'INSERT INTO batch_rows VALUES ($1, azure_local_ai.create_embeddings($2, $3)::vector)',
  batchKept: 'SELECT coalesce(array_agg(id ORDER BY id), ARRAY[]::bigint[]) AS ids FROM batch_rows',
  batchClear: 'TRUNCATE batch_rows',
}

/** The scenario the test wrote on stdin. */
export async function readScenario() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return JSON.parse(Buffer.concat(chunks).toString('utf8'))
}

/** The SQLSTATE (or, for a client-side failure, the message) of a settled promise's error. */
export function outcome(settled) {
  if (settled.status === 'fulfilled') return { ok: true }
  return { ok: false, sqlstate: settled.reason.code ?? null, message: String(settled.reason.message) }
}
