// postgres.js through the proxy: `node postgres.mjs DSN prepare|unnamed [batches-only]` runs the scenario
// on stdin and prints its results as JSON (batches-only: the error batches alone, for a direct server). "prepare" is the default (every parameterised statement a named prepared
// statement, reused by its text); "unnamed" is `prepare: false`, as used behind transaction poolers.
// Queries issued together on the one connection are pipelined, each with its own Sync.
import postgres from 'postgres'
import { SQL, outcome, readScenario } from './scenario.mjs'

const [dsn, mode, only] = process.argv.slice(2)
const s = await readScenario()
const sql = postgres(dsn, { max: 1, prepare: mode === 'prepare', onnotice: () => {} })
const embed = (q, text, model = s.model) => q`SELECT azure_local_ai.create_embeddings(${model}, ${text}) AS e`
const insert = (q, [id, model, text]) =>
  q`INSERT INTO batch_rows VALUES (${id}, azure_local_ai.create_embeddings(${model}, ${text})::vector)`
const kept = async () => (await sql.unsafe(SQL.batchKept))[0].ids.map(Number)
const out = { mode }

if (only !== 'batches-only') {
  out.plain = (await sql.unsafe(SQL.plain(s.model, s.plain)))[0].e
  out.param = (await embed(sql, s.param))[0].e
  out.prepared = []
  for (const text of s.prepared) out.prepared.push((await embed(sql, text))[0].e)
  out.with_ids = (await sql`SELECT id, embedding FROM azure_local_ai.create_embeddings(
      ${s.model}, ${sql.array(s.with_ids.inputs)}::text[], ${sql.array(s.with_ids.ids)}::bigint[])`)
    .map(r => [Number(r.id), r.embedding])
  // The same rows read two at a time through a cursor (Execute with a row limit, PortalSuspended).
  out.with_ids_chunks = []
  await sql`SELECT id, embedding FROM azure_local_ai.create_embeddings(
      ${s.model}, ${sql.array(s.with_ids.inputs)}::text[], ${sql.array(s.with_ids.ids)}::bigint[])`
    .cursor(2, rows => { out.with_ids_chunks.push(rows.map(r => [Number(r.id), r.embedding])) })
  await sql.unsafe(SQL.docsTable)
  for (const doc of s.docs) {
    await sql`INSERT INTO docs VALUES (${doc}, azure_local_ai.create_embeddings(${s.model}, ${doc})::vector)`
  }
  out.nearest = (await sql`SELECT body, v <=> azure_local_ai.create_embeddings(${s.model}, ${s.query})::vector AS d
      FROM docs ORDER BY 2`).map(r => [r.body, r.d])
  out.settings = (await sql`SELECT azure_local_ai.get_setting() AS s`)[0].s
  out.setting = (await sql`SELECT azure_local_ai.get_setting(${s.setting_key}) AS s`)[0].s
  out.metadata = (await sql`SELECT azure_local_ai.model_metadata(${s.model}) AS m`)[0].m
  out.batch = (await Promise.all(s.batch.map(text => embed(sql, text)))).map(r => r[0].e)
}

await sql.unsafe(SQL.batchTable)
out.error_batches = {}
out.transaction_batches = {}
for (const [name, rows] of Object.entries(s.error_batches)) {
  const settled = await Promise.allSettled(rows.map(row => insert(sql, row)))
  out.error_batches[name] = { outcomes: settled.map(outcome), kept: await kept(), after: (await embed(sql, s.after_error))[0].e }
  await sql.unsafe(SQL.batchClear)
  // The same rows pipelined in one transaction: its documented outcome is all or nothing.
  const [whole] = await Promise.allSettled([sql.begin(q => rows.map(row => insert(q, row)))])
  out.transaction_batches[name] = { ...outcome(whole), kept: await kept(), after: (await embed(sql, s.after_error))[0].e }
  await sql.unsafe(SQL.batchClear)
}
await sql.end()
process.stdout.write(JSON.stringify(out))
