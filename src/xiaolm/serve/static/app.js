// 小LM chat page: talks to this server's /v1/chat/completions with stream: true and renders the SSE deltas as they
// arrive (fetch + ReadableStream; TextDecoder in streaming mode, so a character split across network packets is
// never shown broken). The model's thinking (reasoning_content) streams into a dimmed, collapsible block above the
// answer, tool calls show as name + arguments; stream.js folds the deltas. Plain text only (textContent), no external
// resources.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), empty: $("empty"), input: $("input"), send: $("send"), stop: $("stop"),
  clear: $("clear"), system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  topP: $("top-p"), topPValue: $("top-p-value"), maxTokens: $("max-tokens"), modelName: $("model-name"),
  modelContext: $("model-context"), dot: $("status-dot"), composer: $("composer"), thinking: $("thinking"),
  tools: $("tools"),
};

const state = {
  model: null,        // id from /v1/models
  context: null,      // max_model_len
  history: [],        // [{role, content}] of finished turns (the system prompt is added per request)
  controller: null,   // AbortController of the request in flight
};

const SETTINGS_KEY = "xiaolm-chat-settings";
const API_KEY = "xiaolm-api-key";

// fetch with the API key (xiaolm serve --api-key) when the server asks for one: asked once on a 401 and kept for
// this tab only (sessionStorage: gone when the tab closes, never shared with other sites).
async function apiFetch(url, options = {}) {
  const send = () => {
    let key = null;
    try { key = sessionStorage.getItem(API_KEY); } catch (_) { /* storage disabled */ }
    const headers = { ...(options.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    return fetch(url, { ...options, headers });
  };
  let response = await send();
  if (response.status === 401) {
    const key = window.prompt("这个服务器需要 API key（xiaolm serve --api-key）：");
    if (key) {
      try { sessionStorage.setItem(API_KEY, key.trim()); } catch (_) { /* storage disabled */ }
      response = await send();
    }
  }
  return response;
}

// ------------------------------------------------------------------------------------------- settings

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
    if (typeof saved.system === "string") els.system.value = saved.system;
    if (saved.temperature != null) els.temperature.value = saved.temperature;
    if (saved.topP != null) els.topP.value = saved.topP;
    if (saved.maxTokens != null) els.maxTokens.value = saved.maxTokens;
    if (typeof saved.thinking === "boolean") els.thinking.checked = saved.thinking;
    if (typeof saved.tools === "string") els.tools.value = saved.tools;
  } catch (_) { /* private mode or corrupt value: keep the defaults */ }
  showSliderValues();
}

function saveSettings() {
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify({
      system: els.system.value, temperature: els.temperature.value, topP: els.topP.value,
      maxTokens: els.maxTokens.value, thinking: els.thinking.checked, tools: els.tools.value,
    }));
  } catch (_) { /* storage unavailable: settings last for this page only */ }
}

function showSliderValues() {
  els.temperatureValue.textContent = Number(els.temperature.value).toFixed(2);
  els.topPValue.textContent = Number(els.topP.value).toFixed(2);
}

// The Max tokens field is a cap; empty (the default) means "as much as fits", which the server works out.
function maxTokens() {
  const n = parseInt(els.maxTokens.value, 10);
  if (!Number.isFinite(n) || n < 1) return null;
  return state.context ? Math.min(n, state.context - 1) : n;
}

// ------------------------------------------------------------------------------------------ rendering

function nearBottom() {
  const m = els.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollDown(force) {
  if (force || nearBottom()) els.messages.scrollTop = els.messages.scrollHeight;
}

function copyText(text, button) {
  const done = () => {
    const old = button.textContent;
    button.textContent = "已复制";
    setTimeout(() => { button.textContent = old; }, 1200);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text) && done());
  } else if (fallbackCopy(text)) {
    done();
  }
}

function fallbackCopy(text) {
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
  area.remove();
  return ok;
}

// A message bubble: {root, body, foot}; an assistant's also gets its thinking block and tool calls as they come.
function addMessage(role, text) {
  els.empty.hidden = true;
  const root = document.createElement("div");
  root.className = `msg ${role}`;
  root.dataset.role = role;
  const head = document.createElement("div");
  head.className = "msg-head";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "你" : "小LM";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "复制";
  copy.title = "复制这条消息";
  const body = document.createElement("div");
  body.className = "msg-body";
  body.textContent = text;
  const foot = document.createElement("div");
  foot.className = "msg-foot";
  copy.addEventListener("click", () => copyText(body.textContent, copy));
  head.append(who, copy);
  root.append(head, body, foot);
  els.messages.appendChild(root);
  scrollDown(true);
  return { root, body, foot };
}

// The thinking block (dimmed, collapsible): made when the first reasoning arrives, open while the model thinks,
// folded once the answer or a call begins (a click opens it again).
function showReasoning(view, text) {
  if (!view.reasoning) {
    const box = document.createElement("details");
    box.className = "reasoning";
    box.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "思考过程 Thinking";
    const inner = document.createElement("div");
    inner.className = "reasoning-body";
    box.append(summary, inner);
    view.root.insertBefore(box, view.body);
    view.reasoning = { box, inner };
  }
  view.reasoning.inner.textContent = text.trim();
}

// Tool calls: one line each, the function's name and its arguments (JSON), below the answer.
function showToolCalls(view, calls) {
  if (!view.calls) {
    view.calls = document.createElement("div");
    view.calls.className = "tool-calls";
    view.root.insertBefore(view.calls, view.foot);
  }
  view.calls.replaceChildren(...calls.filter(Boolean).map((call) => {
    const row = document.createElement("div");
    row.className = "tool-call";
    const label = document.createElement("span");
    label.className = "tool-label";
    label.textContent = "调用工具";
    const name = document.createElement("span");
    name.className = "tool-name";
    name.textContent = call.name;
    const args = document.createElement("code");
    args.className = "tool-args";
    args.textContent = formatArguments(call.arguments);
    row.append(label, name, args);
    return row;
  }));
}

function render(view, reply, streaming) {
  if (reply.reasoning) showReasoning(view, reply.reasoning);
  const answering = reply.content.trim() || reply.toolCalls.length;
  if (view.reasoning && answering && streaming && !view.folded) {
    view.reasoning.box.open = false;   // the thinking is done: make room for the answer
    view.folded = true;
  }
  // small models like to open with blank lines
  view.body.textContent = streaming ? reply.content.trimStart() : reply.content.trim();
  if (reply.toolCalls.length) showToolCalls(view, reply.toolCalls);
}

function setBusy(busy) {
  els.send.disabled = busy;
  els.send.hidden = busy;
  els.stop.hidden = !busy;
}

// ------------------------------------------------------------------------------------------ streaming

async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error) {
      return { message: body.error.message || `HTTP ${response.status}`, code: body.error.code, param: body.error.param };
    }
  } catch (_) { /* not JSON */ }
  return { message: `HTTP ${response.status}`, code: null, param: null };
}

// The tools box: OpenAI function schemas (a list, or one schema), sent as `tools`; empty: no tools.
function toolSchemas() {
  const text = els.tools.value.trim();
  if (!text) return null;
  let value;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new Error(`工具定义不是合法的 JSON（tools: ${err.message}）`);
  }
  return Array.isArray(value) ? value : [value];
}

// POST the conversation. Old turns are dropped only when the conversation itself no longer fits the context
// window (the server names "messages"); a Max tokens that does not fit beside it is instead left to the server,
// which then allows what the window has left. Returns {response, dropped, clamped}.
async function postChat(turn, signal) {
  const system = els.system.value.trim();
  const tools = toolSchemas();
  let history = state.history.slice();
  let dropped = 0;
  let limit = maxTokens();
  let clamped = false;
  for (let attempt = 0; attempt <= state.history.length / 2 + 2; attempt++) {
    const messages = [];
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history, turn);
    const request = {
      model: state.model, messages, stream: true, stream_options: { include_usage: true },
      temperature: Number(els.temperature.value), top_p: Number(els.topP.value),
      chat_template_kwargs: { enable_thinking: els.thinking.checked },
    };
    if (tools) request.tools = tools;
    if (limit !== null) request.max_tokens = limit;
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request), signal,
    });
    if (response.ok) return { response, dropped, clamped };
    const error = await readError(response);
    if (error.code !== "context_length_exceeded") throw new Error(error.message);
    if (error.param === "max_tokens" && limit !== null) {
      limit = null;   // the conversation fits, the cap does not: answer with what is left
      clamped = true;
    } else if (history.length >= 2) {
      history = history.slice(2);
      dropped += 1;
    } else {
      throw new Error(`${error.message}（这条消息太长了，请缩短后再发）`);
    }
  }
  throw new Error("对话超出了模型的上下文长度");
}

async function send() {
  const text = els.input.value.trim();
  if (!text || state.controller) return;
  if (!state.model) {
    await loadModel();
    if (!state.model) return;
  }
  saveSettings();
  els.input.value = "";
  autosize();
  addMessage("user", text);
  const turn = { role: "user", content: text };

  const reply = addMessage("assistant", "");
  reply.root.dataset.state = "streaming";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let firstTokenAt = null;
  const answer = newReply();
  let finish = null;
  let usage = null;
  let failure = null;
  let dropped = 0;
  let clamped = false;

  try {
    const posted = await postChat(turn, controller.signal);
    dropped = posted.dropped;
    clamped = posted.clamped;
    if (dropped) showDropped(reply, dropped);
    const reader = posted.response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      buffer = takeEvents(buffer, (data) => {
        if (data === "[DONE]") { finished = true; return; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.index !== 0) continue;
          const delta = choice.delta || {};
          if (delta.content || delta.reasoning_content || delta.tool_calls) {
            if (firstTokenAt === null) firstTokenAt = performance.now();
            applyDelta(answer, delta);
            render(reply, answer, true);
            scrollDown(false);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
    }
    if (!finished) throw new Error("连接在回答结束前中断了（connection closed early）");
  } catch (err) {
    failure = err;
  } finally {
    state.controller = null;
    setBusy(false);
  }

  const seconds = (performance.now() - started) / 1000;
  render(reply, answer, false);
  const content = answer.content.trim();
  const said = content || answer.toolCalls.length;
  if (failure && failure.name === "AbortError") {
    reply.root.dataset.state = "stopped";
    reply.foot.textContent = "已停止 (stopped)";
    if (said) state.history.push(turn, historyTurn(answer));
  } else if (failure) {
    reply.root.dataset.state = "error";
    reply.root.classList.add("error");
    const msg = document.createElement("div");
    msg.className = "msg-error";
    msg.textContent = `出错了：${failure.message}`;
    reply.root.appendChild(msg);
    if (!els.input.value) els.input.value = text;   // give the message back so it can be re-sent
  } else {
    reply.root.dataset.state = "done";
    state.history.push(turn, historyTurn(answer));
    const parts = [];
    if (usage) {
      parts.push(`${usage.completion_tokens} tokens`);
      if (seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
    }
    if (firstTokenAt !== null) parts.push(`首字 ${((firstTokenAt - started) / 1000).toFixed(2)} s`);
    if (finish === "length") parts.push("达到长度上限 (length)");
    if (finish === "tool_calls") parts.push("模型调用了工具 (tool_calls)");
    if (clamped) parts.push("最大生成长度已按上下文剩余空间缩短");
    if (!said) parts.push("（模型没有生成文字）");
    reply.foot.textContent = parts.join(" · ");
  }
  scrollDown(false);
  els.input.focus();
}

// Say plainly that the model did not see the whole conversation this time.
function showDropped(reply, dropped) {
  const note = document.createElement("div");
  note.className = "msg-note";
  note.textContent = `对话已超出模型的上下文长度（${state.context || "?"} tokens）：较早的 ${dropped} 轮对话这次没有发送给模型。`;
  reply.root.insertBefore(note, reply.body);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clearChat() {
  stop();
  state.history = [];
  for (const node of [...els.messages.querySelectorAll(".msg")]) node.remove();
  els.empty.hidden = false;
  els.input.focus();
}

// ----------------------------------------------------------------------------------------- the model

async function loadModel() {
  try {
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw new Error((await readError(response)).message);
    const body = await response.json();
    const card = body.data[0];
    state.model = card.id;
    state.context = card.max_model_len || null;
    els.modelName.textContent = card.id;
    els.modelContext.textContent = state.context ? `上下文 ${state.context} tokens` : "";
    if (state.context) els.maxTokens.max = String(state.context - 1);
    els.dot.className = "dot ok";
    els.dot.title = "已连接";
  } catch (err) {
    els.modelName.textContent = `无法连接服务器：${err.message}`;
    els.dot.className = "dot bad";
    els.dot.title = "未连接";
  }
}

// ------------------------------------------------------------------------------------------- wiring

function autosize() {
  els.input.style.height = "auto";
  els.input.style.height = `${Math.min(els.input.scrollHeight, 192)}px`;
}

els.composer.addEventListener("submit", (event) => { event.preventDefault(); send(); });
els.input.addEventListener("keydown", (event) => {
  // While an input method is composing (拼音 candidates), Enter confirms the candidate: it must not send.
  if (event.isComposing || event.keyCode === 229) return;
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    send();
  }
});
els.input.addEventListener("input", autosize);
els.stop.addEventListener("click", stop);
els.clear.addEventListener("click", clearChat);
for (const el of [els.temperature, els.topP]) el.addEventListener("input", showSliderValues);
for (const el of [els.system, els.temperature, els.topP, els.maxTokens, els.thinking, els.tools]) {
  el.addEventListener("change", saveSettings);
}

loadSettings();
loadModel();
els.input.focus();
