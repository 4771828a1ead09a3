// node-postgres through the proxy: `node pg.mjs DSN plain|pipeline [batches-only]` runs the scenario on
// stdin and prints its results as JSON (batches-only: the error batches alone, for a direct server). "pipeline" is the client's pipeline mode (every query sent at once, each
// with its own Sync); "plain" awaits each query before sending the next (queueing queries on a client
// that is busy is deprecated in pg 8 outside pipeline mode).
import pg from 'pg'
import { SQL, outcome, readScenario } from './scenario.mjs'

const [dsn, mode, only] = process.argv.slice(2)
const s = await readScenario()
const client = new pg.Client({ connectionString: dsn, pipeline: mode === 'pipeline' })
await client.connect()
const one = async (text, values) => (await client.query(text, values)).rows
/** Run a batch the mode's way; settle every query (a failure does not stop the others being sent). */
async function batch(queries) {
  if (mode === 'pipeline') return Promise.allSettled(queries.map(([text, values]) => client.query(text, values)))
  const settled = []
  for (const [text, values] of queries) {
    try {
      settled.push({ status: 'fulfilled', value: await client.query(text, values) })
    } catch (reason) {
      settled.push({ status: 'rejected', reason })
    }
  }
  return settled
}
const out = { mode }

if (only !== 'batches-only') {
  out.plain = (await one(SQL.plain(s.model, s.plain)))[0].e
  out.param = (await one(SQL.param, [s.model, s.param]))[0].e
  out.prepared = []
  for (const text of s.prepared) {
    const rows = (await client.query({ name: 'embed', text: SQL.param, values: [s.model, text] })).rows
    out.prepared.push(rows[0].e)
  }
  out.with_ids = (await one(SQL.withIds, [s.model, s.with_ids.inputs, s.with_ids.ids]))
    .map(r => [Number(r.id), r.embedding])
  await one(SQL.docsTable)
  for (const doc of s.docs) await one(SQL.insertDoc, [s.model, doc])
  out.nearest = (await one(SQL.nearest, [s.model, s.query])).map(r => [r.body, r.distance])
  out.settings = (await one(SQL.settings))[0].s
  out.setting = (await one(SQL.setting, [s.setting_key]))[0].s
  out.metadata = (await one(SQL.metadata, [s.model]))[0].m
  out.batch = (await batch(s.batch.map(text => [SQL.param, [s.model, text]]))).map(r => r.value.rows[0].e)
}

await one(SQL.batchTable)
out.error_batches = {}
for (const [name, rows] of Object.entries(s.error_batches)) {
  const settled = await batch(rows.map(row => [SQL.batchInsert, row]))
  out.error_batches[name] = {
    outcomes: settled.map(outcome),
    kept: (await one(SQL.batchKept))[0].ids.map(Number),
    after: (await one(SQL.param, [s.model, s.after_error]))[0].e,
  }
  await one(SQL.batchClear)
}
await client.end()
process.stdout.write(JSON.stringify(out))
