// 小LM chat page, the stream's parsing (no DOM): SSE text into events, and chat-completion deltas folded into one
// reply {reasoning, content, toolCalls} (vLLM's / OpenAI's layout). Loaded by index.html before app.js; node can
// require() it too, which is how the tests run it on a real server's stream.
"use strict";

// Parse SSE text into events; returns the unparsed remainder (an event not yet complete).
function takeEvents(buffer, onData) {
  const parts = buffer.split(/\r?\n\r?\n/);
  const rest = parts.pop();
  for (const part of parts) {
    const data = part.split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (data) onData(data);   // comment lines (": keep-alive") carry no data
  }
  return rest;
}

function newReply() {
  return { reasoning: "", content: "", toolCalls: [] };
}

// Fold one choice's delta into the reply: reasoning_content and content append; a tool call arrives as
// {index, id, type, function: {name, arguments}} and later pieces of its arguments under the same index.
function applyDelta(reply, delta) {
  if (!delta) return reply;
  if (typeof delta.reasoning_content === "string") reply.reasoning += delta.reasoning_content;
  if (typeof delta.content === "string") reply.content += delta.content;
  for (const piece of delta.tool_calls || []) {
    const i = Number.isInteger(piece.index) ? piece.index : reply.toolCalls.length;
    if (!reply.toolCalls[i]) reply.toolCalls[i] = { id: null, name: "", arguments: "" };
    const call = reply.toolCalls[i];
    const fn = piece.function || {};
    if (piece.id) call.id = piece.id;
    if (typeof fn.name === "string" && fn.name) call.name = fn.name;
    if (typeof fn.arguments === "string") call.arguments += fn.arguments;
  }
  return reply;
}

// A call's arguments as shown: compact JSON once they parse (the stream may still be mid-object), else as they came.
function formatArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text));
  } catch (_) {
    return text;
  }
}

// The assistant turn to send back in the history: the answer and any calls (earlier turns' thinking is not sent:
// the chat format drops it, as Qwen3's does).
function historyTurn(reply) {
  const turn = { role: "assistant", content: reply.content.trim() };
  const calls = reply.toolCalls.filter((c) => c && c.name);
  if (calls.length) {
    turn.tool_calls = calls.map((c) => ({
      id: c.id, type: "function", function: { name: c.name, arguments: c.arguments },
    }));
  }
  return turn;
}

if (typeof module === "object" && module.exports) {
  module.exports = { takeEvents, newReply, applyDelta, formatArguments, historyTurn };
}
