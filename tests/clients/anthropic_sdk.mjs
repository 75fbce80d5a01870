// The official @anthropic-ai/sdk package (node) against scillm's /v1/messages: create, stream, and a tool through
// a hand-written tool loop.  config: {base_url, api_key, model, scenarios}
import { load, run, weather } from './harness.mjs';

const { default: Anthropic } = await load('@anthropic-ai/sdk');
const client = (c) => new Anthropic({ baseURL: c.base_url, apiKey: c.api_key, maxRetries: 0, timeout: 20000 });
const TOOL = { name: 'get_weather', description: 'The weather in a city.',
  input_schema: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } };
const text = (message) => message.content.filter((b) => b.type === 'text').map((b) => b.text).join('');

await run({
  async create(c) {
    const m = await client(c).messages.create({ model: c.model, max_tokens: 256,
                                                messages: [{ role: 'user', content: 'hi' }] });
    return { text: text(m), stop: m.stop_reason, usage: m.usage };
  },
  async stream(c) {
    const stream = client(c).messages.stream({ model: c.model, max_tokens: 256,
                                               messages: [{ role: 'user', content: 'hi' }] });
    const deltas = [];
    stream.on('text', (delta) => deltas.push(delta));
    const m = await stream.finalMessage();
    return { deltas, text: text(m), stop: m.stop_reason, usage: m.usage };
  },
  async error(c) {
    try {
      await client(c).messages.create({ model: c.model, max_tokens: 256, messages: [{ role: 'user', content: 'hi' }] });
    } catch (e) {
      return { name: e.constructor.name, status: e.status, type: e.error?.error?.type, message: e.error?.error?.message };
    }
    return null;
  },
  async tools(c) {
    const anthropic = client(c);
    const messages = [{ role: 'user', content: 'Weather in Paris?' }];
    const first = await anthropic.messages.stream({ model: c.model, max_tokens: 256, messages, tools: [TOOL] })
      .finalMessage();
    messages.push({ role: 'assistant', content: first.content });
    const uses = first.content.filter((b) => b.type === 'tool_use');
    messages.push({ role: 'user', content: await Promise.all(uses.map(async (b) => ({
      type: 'tool_result', tool_use_id: b.id, content: await weather(b.input) }))) });
    const second = await anthropic.messages.create({ model: c.model, max_tokens: 256, messages, tools: [TOOL] });
    return { stop: first.stop_reason, calls: uses.map((b) => [b.name, b.input]), text: text(second),
             second_stop: second.stop_reason };
  },
});
