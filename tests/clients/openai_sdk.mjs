// The official openai package (node) against scillm: chat completions and the Responses API, created and
// streamed, and a function tool through a hand-written tool loop.  config: {base_url, api_key, model, scenarios}
import { load, run, weather } from './harness.mjs';

const { default: OpenAI } = await load('openai');
const { zodResponseFormat, zodTextFormat } = await load('openai/helpers/zod');
const { z } = await load('zod');
const REPORT = z.object({ city: z.string(), sunny: z.boolean() });
const client = (c) => new OpenAI({ baseURL: `${c.base_url}/v1`, apiKey: c.api_key, maxRetries: 0, timeout: 20000 });
const TOOL = { type: 'function', function: { name: 'get_weather', description: 'The weather in a city.',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } };
const RESPONSES_TOOL = { type: 'function', name: 'get_weather', description: 'The weather in a city.', strict: false,
  parameters: TOOL.function.parameters };

await run({
  async chat(c) {
    const r = await client(c).chat.completions.create({ model: c.model, messages: [{ role: 'user', content: 'hi' }] });
    return { text: r.choices[0].message.content, finish: r.choices[0].finish_reason, usage: r.usage };
  },
  async chat_stream(c) {
    const stream = await client(c).chat.completions.create({
      model: c.model, messages: [{ role: 'user', content: 'hi' }], stream: true,
      stream_options: { include_usage: true } });
    const deltas = [];
    let usage = null;
    let finish = null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        if (choice.delta?.content) deltas.push(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    return { deltas, finish, usage };
  },
  async chat_tools(c) {
    const openai = client(c);
    const messages = [{ role: 'user', content: 'Weather in Paris?' }];
    // the helper's stream accumulates the tool call's argument deltas into the final message
    const stream = openai.chat.completions.stream({ model: c.model, messages, tools: [TOOL] });
    const first = (await stream.finalChatCompletion()).choices[0];
    messages.push(first.message);
    for (const call of first.message.tool_calls ?? []) {
      messages.push({ role: 'tool', tool_call_id: call.id, content: await weather(JSON.parse(call.function.arguments)) });
    }
    const second = await openai.chat.completions.create({ model: c.model, messages, tools: [TOOL] });
    return { finish: first.finish_reason, calls: (first.message.tool_calls ?? []).map((t) => [t.function.name,
      JSON.parse(t.function.arguments)]), text: second.choices[0].message.content };
  },
  async chat_parse(c) {
    const r = await client(c).chat.completions.parse({ model: c.model, messages: [{ role: 'user', content: 'w?' }],
                                                       response_format: zodResponseFormat(REPORT, 'weather') });
    return { parsed: r.choices[0].message.parsed };
  },
  async responses_parse(c) {
    const r = await client(c).responses.parse({ model: c.model, input: 'w?', text: { format: zodTextFormat(REPORT,
                                                                                                  'weather') } });
    return { parsed: r.output_parsed };
  },
  async error(c) {
    try {
      await client(c).chat.completions.create({ model: c.model, messages: [{ role: 'user', content: 'hi' }] });
    } catch (e) {
      return { name: e.constructor.name, status: e.status, type: e.type, message: e.message };
    }
    return null;
  },
  async responses(c) {
    const r = await client(c).responses.create({ model: c.model, input: 'hi' });
    return { text: r.output_text, status: r.status, usage: r.usage };
  },
  async responses_stream(c) {
    const stream = client(c).responses.stream({ model: c.model, input: 'hi' });
    const deltas = [];
    for await (const event of stream) if (event.type === 'response.output_text.delta') deltas.push(event.delta);
    const r = await stream.finalResponse();
    return { deltas, text: r.output_text, usage: r.usage };
  },
  async responses_tools(c) {
    const openai = client(c);
    const first = await openai.responses.create({ model: c.model, input: 'Weather in Paris?', tools: [RESPONSES_TOOL] });
    const calls = first.output.filter((item) => item.type === 'function_call');
    const outputs = [];
    for (const call of calls) {
      outputs.push({ type: 'function_call_output', call_id: call.call_id,
                     output: await weather(JSON.parse(call.arguments)) });
    }
    const second = await openai.responses.create({ model: c.model, input: [{ role: 'user', content: 'Weather in Paris?' },
      ...first.output, ...outputs], tools: [RESPONSES_TOOL] });
    return { calls: calls.map((t) => [t.name, JSON.parse(t.arguments)]), text: second.output_text };
  },
});
