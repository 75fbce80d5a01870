// Shared by the client scripts beside it: loads the pinned clients from tools/js-clients (SCILLM_JS_CLIENTS) and
// runs the scenarios the command line names ([[key, scenario, model], ...]) one after another, printing
// {key: {value} | {error}} as JSON.
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const root = process.env.SCILLM_JS_CLIENTS;
if (!root) throw new Error('SCILLM_JS_CLIENTS is not set (the tools/js-clients directory)');
const resolve = createRequire(join(root, 'package.json')).resolve;

/** Import a client package from the pinned install; a missing install throws (the test fails, never skips). */
export const load = (name) => import(pathToFileURL(resolve(name)).href);

export async function run(scenarios) {
  const config = JSON.parse(process.argv[2]);
  const out = {};
  for (const [key, name, model] of config.scenarios) {
    try {
      out[key] = { value: await scenarios[name]({ ...config, model }) };
    } catch (e) {
      out[key] = { error: `${e?.name}: ${e?.message}`, body: e?.responseBody ?? e?.error ?? null,
                    stack: String(e?.stack ?? '').split('\n').slice(0, 6).join('\n') };
    }
  }
  process.stdout.write(JSON.stringify(out));
}

export const REPORT_SCHEMA = (z) => z.object({ city: z.string(), sunny: z.boolean() }).describe('A weather report.');
export const weather = async ({ city }) => `sunny in ${city}`;
