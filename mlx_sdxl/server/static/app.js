// mlx-sdxl's page: a form for /sdapi/v1/txt2img, a progress bar with the live preview, and a
// gallery of this session's images. Plain JavaScript; it talks only to the server that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
let polling = null;

function describe(status, body) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("\n");
  }
  return `${status}: ${detail || "request failed"}`;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(describe(response.status, body));
  return body;
}

function fill(select, items, emptyText) {
  select.replaceChildren();
  for (const item of items) select.add(new Option(item.label, item.value));
  if (!items.length) select.add(new Option(emptyText, ""));
  select.disabled = !items.length;
}

async function loadChoices() {
  const [samplers, loras, options] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/loras"), api("/sdapi/v1/options")]);
  const own = { label: "the model's own", value: "" };
  fill($("sampler"), [own, ...samplers.map((s) => ({ label: s.name, value: s.name }))], "");
  fill($("lora"), loras.map((l) => ({ label: l.alias, value: l.name })), "no LoRA in --lora-dir");
  $("add-lora").disabled = !loras.length;
  $("model").textContent = options.sd_model_checkpoint;
}

function payload() {
  const number = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value, negative_prompt: $("negative").value,
    width: number("width"), height: number("height"), steps: number("steps"),
    sampler_name: $("sampler").value || null, cfg_scale: number("cfg"), seed: number("seed"),
  };
}

async function poll() {
  try {
    const p = await api("/sdapi/v1/progress");
    const s = p.state;
    if (s.job) {
      $("bar").value = Math.round(p.progress * 100);
      $("status").textContent = `${s.job}: step ${s.sampling_step}/${s.sampling_steps}` +
        (s.job_count > 1 ? `, batch ${s.job_no + 1}/${s.job_count}` : "") +
        `, about ${Math.ceil(p.eta_relative)} s left`;
    }
    if (p.current_image) {
      $("preview").src = `data:image/png;base64,${p.current_image}`;
      $("preview").hidden = false;
    }
  } catch (e) {
    $("status").textContent = `progress: ${e.message}`;
  }
  if (polling !== null) polling = setTimeout(poll, POLL_MS);
}

function addImage(b64, infotext, seed) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${b64}`;
  img.alt = infotext.split("\n")[0];
  const caption = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.textContent = infotext;
  const link = document.createElement("a");
  link.href = img.src;
  link.download = `mlx-sdxl-${seed}.png`;
  link.textContent = "Download PNG";
  caption.append(pre, link);
  figure.append(img, caption);
  $("gallery").prepend(figure);
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("bar").value = 0;
  polling = setTimeout(poll, 0);
  try {
    const result = await api("/sdapi/v1/txt2img", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload()),
    });
    const info = JSON.parse(result.info);
    result.images.forEach((b64, i) => addImage(b64, info.infotexts[i] || "", info.all_seeds[i]));
    $("bar").value = 100;
    $("status").textContent = info.interrupted ? "interrupted" : `done in ${info.seconds} s`;
  } catch (e) {
    $("error").textContent = e.message;
    $("status").textContent = "failed";
  } finally {
    clearTimeout(polling);
    polling = null;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("preview").hidden = true;
  }
}

function addLora() {
  const name = $("lora").value;
  if (name) $("prompt").value = `${$("prompt").value.trim()} <lora:${name}:0.8>`.trim();
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", { method: "POST" }));
  $("add-lora").addEventListener("click", addLora);
  loadChoices().catch((e) => { $("error").textContent = e.message; });
});
