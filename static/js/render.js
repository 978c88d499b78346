// Renders untrusted Markdown from the model incrementally: sanitized, highlighted, at most once per animation frame.

import { Marked } from "../vendor/marked-18.2.1.esm.js";
import DOMPurify from "../vendor/purify-3.4.18.es.js";
import hljs from "../vendor/highlight-11.12.0.min.js";
import { t } from "./i18n.js";

const purifier = DOMPurify(window);

const PURIFY_CONFIG = {
  USE_PROFILES: { html: true },
  // Images, media and embeds could load from anywhere (and the page's CSP would refuse them anyway).
  FORBID_TAGS: [
    "style", "img", "picture", "source", "video", "audio", "track", "iframe", "frame", "frameset",
    "object", "embed", "form", "button", "textarea", "select", "option", "link", "meta", "base",
  ],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "background", "poster"],
  ADD_ATTR: ["target"],
  ALLOW_DATA_ATTR: false,
};

purifier.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    if (node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    } else {
      node.removeAttribute("target");
    }
  }
});

function escapeHtml(text) {
  return String(text)
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

const markdown = new Marked({ gfm: true, breaks: false });
markdown.use({
  renderer: {
    // Raw HTML from the model is shown as text, the way it was written.
    html({ text, block }) {
      return block ? `<p class="raw-html">${escapeHtml(text)}</p>\n` : escapeHtml(text);
    },
    // Markdown images become plain links: the page loads images only from its own origin.
    image({ href, text }) {
      return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`;
    },
  },
});

/** Returns a sanitized DocumentFragment for untrusted HTML. */
export function sanitize(html) {
  return purifier.sanitize(html, { ...PURIFY_CONFIG, RETURN_DOM_FRAGMENT: true });
}

function languageOf(code) {
  const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className || "");
  return match ? match[1].toLowerCase() : "";
}

function highlightInto(code, text, language) {
  let html;
  if (language && hljs.getLanguage(language)) {
    html = hljs.highlight(text, { language, ignoreIllegals: true }).value;
  } else {
    html = escapeHtml(text);
  }
  code.replaceChildren(sanitize(html));
  code.classList.add("hljs");
}

function buildCodeBlock(pre) {
  const code = pre.querySelector("code") || pre;
  const language = languageOf(code);
  const text = code.textContent.replace(/\n$/, "");

  const block = document.createElement("div");
  block.className = "code-block";
  const header = document.createElement("div");
  header.className = "code-header";
  const label = document.createElement("span");
  label.className = "code-lang";
  label.textContent = language || t("message.code");
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.dataset.i18n = "message.copy";
  copy.textContent = t("message.copy");
  header.append(label, copy);

  const newPre = document.createElement("pre");
  const newCode = document.createElement("code");
  if (language) newCode.className = `language-${language}`;
  highlightInto(newCode, text, language);
  newPre.append(newCode);
  block.append(header, newPre);
  block.dataset.language = language;
  return block;
}

function enhance(fragment) {
  for (const pre of [...fragment.querySelectorAll("pre")]) pre.replaceWith(buildCodeBlock(pre));
  for (const table of [...fragment.querySelectorAll("table")]) {
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.append(table);
  }
  return fragment;
}

function renderTokens(tokens, links) {
  const list = [...tokens];
  list.links = links;
  return enhance(sanitize(markdown.parser(list)));
}

/** Renders a whole Markdown text into a sanitized fragment (for text that no longer changes). */
export function renderMarkdown(text) {
  const tokens = markdown.lexer(text);
  return renderTokens(tokens, tokens.links);
}

/** Returns the text a code block's Copy button copies. */
export function codeTextOf(block) {
  const code = block.querySelector("pre code");
  return code ? code.textContent.replace(/\n$/, "") : "";
}

function nextFrame(callback) {
  // Hidden tabs get no animation frames; a timer keeps their text moving.
  if (document.hidden) {
    const timer = setTimeout(callback, 100);
    return () => clearTimeout(timer);
  }
  const frame = requestAnimationFrame(callback);
  return () => cancelAnimationFrame(frame);
}

/**
 * Shows a growing Markdown text in a container.
 *
 * Each top-level block keeps its DOM while its source is unchanged, so finished
 * paragraphs and code blocks are neither rebuilt nor re-highlighted as tokens arrive.
 */
export class MarkdownView {
  constructor(container, { onRender = null } = {}) {
    this.container = container;
    this.source = "";
    this.blocks = [];
    this.cancelFrame = null;
    this.onRender = onRender;
    this.renders = 0;
  }

  /** Replaces the whole text; renders on the next animation frame. */
  setText(text) {
    if (text === this.source) return;
    this.source = text;
    this.schedule();
  }

  /** Adds text at the end; renders on the next animation frame. */
  append(text) {
    if (text) this.setText(this.source + text);
  }

  /** Renders now if a render is pending. */
  flush() {
    if (!this.cancelFrame) return;
    this.cancelFrame();
    this.cancelFrame = null;
    this.render();
  }

  /** Stops any pending render. */
  dispose() {
    if (this.cancelFrame) this.cancelFrame();
    this.cancelFrame = null;
  }

  schedule() {
    if (this.cancelFrame) return;
    this.cancelFrame = nextFrame(() => {
      this.cancelFrame = null;
      this.render();
    });
  }

  render() {
    this.renders += 1;
    const tokens = markdown.lexer(this.source);
    const visible = tokens.filter((token) => token.type !== "space" && token.type !== "def");
    visible.forEach((token, index) => {
      const old = this.blocks[index];
      if (old && old.raw === token.raw) return;
      if (old && old.type === "code" && token.type === "code" && old.nodes.length === 1) {
        this.updateCodeBlock(old, token);
        return;
      }
      const fragment = renderTokens([token], tokens.links);
      const nodes = fragment.childNodes.length ? [...fragment.childNodes] : [document.createTextNode("")];
      if (old) {
        old.nodes[0].before(...nodes);
        for (const node of old.nodes) node.remove();
      } else {
        this.container.append(...nodes);
      }
      this.blocks[index] = { raw: token.raw, type: token.type, nodes };
    });
    for (const extra of this.blocks.splice(visible.length)) {
      for (const node of extra.nodes) node.remove();
    }
    if (this.onRender) this.onRender();
  }

  updateCodeBlock(block, token) {
    // The code block that is still growing keeps its element and Copy button; only its code changes.
    const element = block.nodes[0];
    const code = element.querySelector("pre code");
    const language = (token.lang || "").trim().split(/\s+/)[0].toLowerCase().replace(/[^\w+#.-]/g, "");
    if (!code || element.dataset.language !== language) {
      const fresh = renderTokens([token], []).firstElementChild;
      element.replaceWith(fresh);
      block.nodes = [fresh];
    } else {
      highlightInto(code, token.text, language);
    }
    block.raw = token.raw;
  }
}
