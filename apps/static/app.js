"use strict";
// The chat page. It keeps the conversation (text, and images as data URLs) and sends all of it
// with every question to the server's OpenAI-compatible /v1/chat/completions, streamed back as
// server-sent events. Boxes, [x1, y1, x2, y2] in integers from 0 to COORDINATE_MAX across the
// image's width and height, are drawn over the image their message is about: the last image
// sent up to that message.

const COORDINATE_MAX = 1000; // as mm1_mlx.boxes: 0..1000 across the image's width and height
const NUMBER = String.raw`\s*(-?\d+(?:\.\d+)?)\s*`;
const BOX = new RegExp(String.raw`\[${NUMBER},${NUMBER},${NUMBER},${NUMBER}\]`, "g");
const MIN_REGION = 8; // coordinate steps: a smaller drag is a click, not a region
const COLORS = 6; // box colours .c0 to .c5 in style.css
const LABEL_CHARS = 28;

const $ = (id) => document.getElementById(id);
const state = { model: null, turns: [], pending: [], controller: null };

function make(tag, className, text = "") {
  const element = document.createElement(tag);
  element.className = className;
  element.textContent = text;
  return element;
}

// -- boxes ---------------------------------------------------------------------------------

const clampCoordinate = (value) => Math.min(COORDINATE_MAX, Math.max(0, value));
const percent = (coordinate) => `${coordinate / (COORDINATE_MAX / 100)}%`;

function parseBoxes(text) {
  return [...text.matchAll(BOX)].map((match) => {
    const [x1, y1, x2, y2] = match.slice(1).map((value) => clampCoordinate(Number(value)));
    const box = [Math.min(x1, x2), Math.min(y1, y2), Math.max(x1, x2), Math.max(y1, y2)];
    return { box, start: match.index, end: match.index + match[0].length };
  });
}

// A box's label: its number and the words before it ("1. Send button [...]" -> "1 Send button").
function boxLabel(text, found, i) {
  const from = i > 0 ? found[i - 1].end : 0;
  const words = text
    .slice(from, found[i].start)
    .split(/\n|[.;!?]\s/)
    .pop()
    .replace(/^[\s\-*•\d.)]+/, "")
    .replace(/[\s:,(=–-]+$/, "")
    .replace(/(\s+(is|are|at|located|in|on|near))+$/i, "")
    .trim();
  const short = words.length > LABEL_CHARS ? `${words.slice(0, LABEL_CHARS - 1)}…` : words;
  return `${i + 1} ${short}`.trim();
}

function place(element, [x1, y1, x2, y2]) {
  Object.assign(element.style, {
    left: percent(x1),
    top: percent(y1),
    width: percent(x2 - x1),
    height: percent(y2 - y1),
  });
}

function drawBoxes(shot, text, found) {
  shot.querySelector(".overlay").replaceChildren(
    ...found.map(({ box }, i) => {
      const frame = make("div", `box c${i % COLORS}`);
      place(frame, box);
      const label = make("span", "", boxLabel(text, found, i));
      label.classList.toggle("inside", box[1] < 80); // no room above the box
      // grows leftwards, inside the image
      label.classList.toggle("right", box[0] > COORDINATE_MAX / 2);
      frame.append(label);
      return frame;
    }),
  );
}

// Text with each box marked in its box's colour and number.
function renderText(element, text, found) {
  element.replaceChildren();
  let at = 0;
  found.forEach(({ start, end }, i) => {
    const mark = make("mark", `ref c${i % COLORS}`, text.slice(start, end));
    mark.dataset.n = i + 1;
    element.append(text.slice(at, start), mark);
    at = end;
  });
  element.append(text.slice(at));
}

// -- images --------------------------------------------------------------------------------

function makeShot(url) {
  const shot = make("figure", "shot");
  const image = make("img", "");
  image.src = url;
  image.alt = "";
  image.draggable = false;
  image.addEventListener("load", () => keepAtEnd());
  image.addEventListener("error", () => shot.classList.add("broken")); // the server will say why
  shot.append(image, make("div", "overlay"));
  return shot;
}

const readDataUrl = (file) =>
  new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });

async function addFiles(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/"));
  const others = [...files].filter((file) => !images.includes(file));
  notice(others.length ? `Not an image: ${others.map((file) => file.name).join(", ")}` : "");
  state.pending.push(...(await Promise.all(images.map(readDataUrl))));
  renderPending();
}

function renderPending() {
  const thumbs = state.pending.map((url, i) => {
    const item = make("div", "thumb");
    const remove = make("button", "remove", "×");
    remove.type = "button";
    remove.title = "Remove this image";
    remove.addEventListener("click", () => {
      state.pending.splice(i, 1);
      renderPending();
    });
    item.append(makeShot(url), remove);
    return item;
  });
  keepAtEnd(() => $("pending").replaceChildren(...thumbs)); // the conversation gets shorter
}

// Dragging on an image writes the region into the question as [x1, y1, x2, y2] (referring).
function startRegion(event) {
  const shot = event.target.closest(".shot");
  if (!shot || event.button !== 0) return;
  event.preventDefault();
  const frame = shot.querySelector("img").getBoundingClientRect();
  const at = (e) => [
    clampCoordinate(((e.clientX - frame.left) / frame.width) * COORDINATE_MAX),
    clampCoordinate(((e.clientY - frame.top) / frame.height) * COORDINATE_MAX),
  ];
  const [x0, y0] = at(event);
  const marquee = make("div", "marquee");
  shot.append(marquee);
  let region = null;
  const move = (e) => {
    const [x, y] = at(e);
    region = [Math.min(x0, x), Math.min(y0, y), Math.max(x0, x), Math.max(y0, y)].map(Math.round);
    place(marquee, region);
  };
  const end = (e) => {
    for (const type of ["pointermove", "pointerup", "pointercancel"]) {
      shot.removeEventListener(type, type === "pointermove" ? move : end);
    }
    marquee.remove();
    const [x1, y1, x2, y2] = region ?? [0, 0, 0, 0];
    const big = x2 - x1 >= MIN_REGION && y2 - y1 >= MIN_REGION;
    if (e.type === "pointerup" && big) insertText(`[${region.join(", ")}]`);
  };
  shot.setPointerCapture(event.pointerId);
  shot.addEventListener("pointermove", move);
  shot.addEventListener("pointerup", end);
  shot.addEventListener("pointercancel", end);
}

function insertText(text) {
  const prompt = $("prompt");
  const { selectionStart: from, selectionEnd: to, value } = prompt;
  const space = from > 0 && !/\s$/.test(value.slice(0, from)) ? " " : "";
  prompt.setRangeText(`${space}${text} `, from, to, "end");
  prompt.focus();
  autosize();
}

// -- the conversation ----------------------------------------------------------------------

const lastImage = () => state.turns.flatMap((turn) => turn.images).at(-1);

function addTurn(role, text, images) {
  const element = make("article", `turn ${role}`);
  const [figures, body, meta] = ["figures", "text", "meta"].map((name) => make("div", name));
  element.append(figures, body, meta);
  const shots = images.map(makeShot);
  figures.append(...shots);
  // Boxes go on the last image of this turn, or else on the last image before it.
  const turn = { role, text, images, element, figures, body, meta, shot: shots.at(-1) };
  turn.about = images.at(-1) ?? lastImage();
  state.turns.push(turn);
  $("turns").append(element);
  updateTurn(turn);
  $("chat").scrollTop = $("chat").scrollHeight;
  return turn;
}

function updateTurn(turn) {
  const found = parseBoxes(turn.text);
  renderText(turn.body, turn.text, found);
  if (found.length && !turn.shot && turn.about) {
    turn.shot = makeShot(turn.about);
    turn.figures.append(turn.shot);
  }
  if (turn.shot) drawBoxes(turn.shot, turn.text, found);
}

function apiMessage(turn) {
  if (turn.role === "assistant") return { role: "assistant", content: turn.text };
  const images = turn.images.map((url) => ({ type: "image_url", image_url: { url } }));
  return { role: "user", content: [...images, { type: "text", text: turn.text }] };
}

async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: ?/, "");
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function statsLine({ timing, usage }, finishReason) {
  const cut = finishReason === "length" ? " · stopped at the token limit" : "";
  const speed = `${timing.decode_tps.toFixed(1)} tokens/s`;
  return `TTFT ${timing.ttft_s.toFixed(2)} s · ${speed} · ${usage.completion_tokens} tokens${cut}`;
}

async function ask(text) {
  if (state.controller || !text) return;
  $("welcome").hidden = true;
  const question = addTurn("user", text, state.pending);
  state.pending = [];
  renderPending();
  $("prompt").value = "";
  autosize();
  notice("");
  const reply = addTurn("assistant", "", []);
  const messages = state.turns.filter((turn) => turn !== reply).map(apiMessage);
  const controller = setBusy(new AbortController());
  reply.element.classList.add("streaming");
  reply.element.setAttribute("aria-busy", "true"); // screen readers read the answer once, whole
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of serverEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const [choice] = event.choices;
      reply.text += choice.delta.content ?? "";
      keepAtEnd(() => updateTurn(reply));
      if (choice.finish_reason) reply.meta.textContent = statsLine(event, choice.finish_reason);
    }
  } catch (error) {
    if (error.name === "AbortError") reply.meta.textContent = "stopped";
    else fail(question, reply, error.message);
  } finally {
    reply.element.classList.remove("streaming");
    reply.element.removeAttribute("aria-busy");
    setBusy(null);
  }
}

// A refused question leaves the conversation; its text and images go back to the composer.
function fail(question, reply, message) {
  state.turns = state.turns.filter((turn) => turn !== question && turn !== reply);
  question.element.classList.add("failed");
  reply.element.classList.add("error");
  reply.body.textContent = message;
  if (!$("prompt").value) $("prompt").value = question.text;
  state.pending.push(...question.images);
  renderPending();
}

function setBusy(controller) {
  state.controller = controller;
  $("send").hidden = Boolean(controller);
  $("stop").hidden = !controller;
  return controller;
}

function reset() {
  state.controller?.abort();
  state.turns = [];
  state.pending = [];
  $("turns").replaceChildren();
  renderPending();
  $("welcome").hidden = false;
  $("prompt").value = "";
  autosize();
  notice("");
}

// -- page ----------------------------------------------------------------------------------

// Runs `change` (if any), then keeps the conversation scrolled to its end if it was there.
function keepAtEnd(change) {
  const chat = $("chat");
  const atEnd = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 48;
  change?.();
  if (atEnd) chat.scrollTop = chat.scrollHeight;
}

function autosize() {
  const prompt = $("prompt");
  prompt.style.height = "auto";
  prompt.style.height = `${prompt.scrollHeight}px`;
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

async function loadModel() {
  try {
    const { data } = await (await fetch("/v1/models")).json();
    state.model = data[0].id;
    $("model").textContent = state.model.split("/").pop();
    $("model").title = state.model;
  } catch {
    $("model").textContent = "server unreachable";
  }
}

const hasFiles = (event) => event.dataTransfer?.types.includes("Files");
let dragDepth = 0; // dragenter/dragleave fire for every element crossed

function listen() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    ask($("prompt").value.trim());
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("prompt").addEventListener("input", autosize);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("reset").addEventListener("click", reset);
  $("files").addEventListener("change", (event) => {
    const files = [...event.target.files];
    event.target.value = "";
    addFiles(files);
  });
  for (const button of document.querySelectorAll(".suggestion")) {
    button.addEventListener("click", () => {
      $("prompt").value = button.textContent;
      autosize();
      $("prompt").focus();
    });
  }
  document.addEventListener("pointerdown", startRegion);
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files ?? [])];
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  document.addEventListener("dragenter", (event) => {
    if (hasFiles(event)) $("drop").hidden = ++dragDepth === 0;
  });
  document.addEventListener("dragleave", (event) => {
    if (hasFiles(event)) $("drop").hidden = --dragDepth === 0;
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    $("drop").hidden = true;
    addFiles(event.dataTransfer.files);
  });
}

listen();
loadModel();
