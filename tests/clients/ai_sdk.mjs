// The Vercel AI SDK against scillm: generateText, streamText, a tool loop (stopWhen), structured output.
// config: {base_url, api_key, provider: openai | openai-chat | openai-compatible | anthropic, model, scenarios}
import { load, run, REPORT_SCHEMA, weather } from './harness.mjs';

const ai = await load('ai');
const { z } = await load('zod');
globalThis.AI_SDK_LOG_WARNINGS = false;

async function model({ base_url, api_key, provider, model }) {
  if (provider === 'anthropic') {
    const { createAnthropic } = await load('@ai-sdk/anthropic');
    return createAnthropic({ baseURL: `${base_url}/v1`, apiKey: api_key })(model);
  }
  if (provider === 'openai-compatible') {
    const { createOpenAICompatible } = await load('@ai-sdk/openai-compatible');
    return createOpenAICompatible({ name: 'scillm', baseURL: `${base_url}/v1`, apiKey: api_key, includeUsage: true,
                                    supportsStructuredOutputs: true })(model);
  }
  const { createOpenAI } = await load('@ai-sdk/openai');
  const openai = createOpenAI({ baseURL: `${base_url}/v1`, apiKey: api_key });
  return provider === 'openai-chat' ? openai.chat(model) : openai(model);
}

// reasoning asked for as each provider's users ask for it (the OpenAI provider only asks models it knows to reason
// unless forced)
const REASONING = { openai: { forceReasoning: true, reasoningEffort: 'low', reasoningSummary: 'auto' },
                    scillm: { reasoningEffort: 'low' },
                    anthropic: { thinking: { type: 'enabled', budgetTokens: 1024 } } };
const usage = (u) => ({ input: u.inputTokens, output: u.outputTokens, total: u.totalTokens });
const tools = () => ({
  get_weather: ai.tool({ description: 'The weather in a city.', inputSchema: z.object({ city: z.string() }),
                         execute: weather }),
});
const loop = (steps) => steps.map((s) => ({
  calls: s.toolCalls.map((c) => [c.toolName, c.input]), results: s.toolResults.map((r) => r.output),
  text: s.text, finish: s.finishReason,
}));

await run({
  async generate(c) {
    const r = await ai.generateText({ model: await model(c), prompt: 'hi', maxRetries: 0 });
    return { text: r.text, usage: usage(r.usage), finish: r.finishReason, warnings: r.warnings };
  },
  async stream(c) {
    const r = ai.streamText({ model: await model(c), prompt: 'hi', maxRetries: 0 });
    const deltas = [];
    for await (const delta of r.textStream) deltas.push(delta);
    return { deltas, text: await r.text, usage: usage(await r.usage), finish: await r.finishReason };
  },
  async tools(c) {
    const r = await ai.generateText({ model: await model(c), prompt: 'Weather in Paris?', tools: tools(),
                                      stopWhen: ai.isStepCount(3), maxRetries: 0 });
    return { text: r.text, steps: loop(r.steps), usage: usage(r.totalUsage) };
  },
  async stream_tools(c) {
    const r = ai.streamText({ model: await model(c), prompt: 'Weather in Paris?', tools: tools(),
                              stopWhen: ai.isStepCount(3), maxRetries: 0 });
    const parts = [];
    for await (const part of r.fullStream) {
      if (part.type === 'tool-call') parts.push(['tool-call', part.toolName, part.input]);
      if (part.type === 'tool-result') parts.push(['tool-result', part.output]);
      if (part.type === 'text-delta') parts.push(['text', part.text]);
      if (part.type === 'error') parts.push(['error', String(part.error)]);
    }
    return { parts, text: await r.text, steps: loop(await r.steps), usage: usage(await r.totalUsage) };
  },
  async conversation(c) {
    // a chat app's loop: the answer's messages go back as history (the OpenAI provider's default, store on, sends
    // its own output items back as item_reference)
    const m = await model(c);
    const messages = [{ role: 'user', content: 'hi' }];
    const first = await ai.generateText({ model: m, messages, maxRetries: 0 });
    messages.push(...first.response.messages, { role: 'user', content: 'and again?' });
    const second = await ai.generateText({ model: m, messages, maxRetries: 0 });
    return { texts: [first.text, second.text] };
  },
  async reasoning_tools(c) {
    const r = ai.streamText({ model: await model(c), prompt: 'Weather in Paris and Rome?', tools: tools(),
                              stopWhen: ai.isStepCount(3), maxRetries: 0, providerOptions: REASONING });
    const steps = await r.steps;
    return { text: await r.text, reasoning: steps.map((s) => s.reasoningText ?? null),
             calls: steps.map((s) => s.toolCalls.map((t) => t.input.city)) };
  },
  async error(c) {
    try {
      await ai.generateText({ model: await model(c), prompt: 'hi', maxRetries: 0 });
    } catch (e) {
      return { name: e.name, status: e.statusCode, retryable: e.isRetryable, message: e.message };
    }
    return null;
  },
  async object(c) {
    const r = await ai.generateObject({ model: await model(c), schema: REPORT_SCHEMA(z), prompt: 'Weather in Paris?',
                                        maxRetries: 0 });
    return { object: r.object, usage: usage(r.usage) };
  },
  async stream_output(c) {
    const r = ai.streamText({ model: await model(c), output: ai.Output.object({ schema: REPORT_SCHEMA(z) }),
                              prompt: 'Weather in Paris?', maxRetries: 0 });
    const partial = [];
    for await (const p of r.partialOutputStream) partial.push(p);
    return { partial, output: await r.output };
  },
});
