"""M3's chat template (Jinja), written into the tiny checkpoint as chat_template.jinja.

Format (m3_architecture.md §8; the released template was not available, ambiguity A8, so production
always renders the checkpoint's own file — this one is ours for the tiny model):
  ]~!b[]~b]system\n{system prompt}{tool list}[e~[\n
  ]~b]user\n{text and ]<]image[>[ markers}[e~[\n
  ]~b]ai\n{<mm:think>reasoning</mm:think>}{content}{tool calls}[e~[\n
  ]~b]tool\n<response>{result}</response>[e~[\n
  generation prompt: ]~b]ai\n, then <mm:think>\n when thinking_mode == "enabled" and </mm:think> when
  "disabled" (the default "adaptive" lets the model decide).
Tool calls use M3's namespaced XML: every tag is preceded by ]<]minimax[>[. Argument values that are not
strings are written as JSON. Each image becomes one ]<]image[>[ marker, which the processor (or the
gateway) expands into start-of-image + N image tokens + end-of-image.
The template uses only constructs that both Jinja2 (transformers) and minijinja (the Rust gateway, with
Python-compatible methods) implement.
"""

CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is none -%}
{%- else -%}{%- for part in content -%}
{%- if part.type == "text" -%}{{ part.text }}
{%- elif part.type in ["image", "image_url"] -%}]<]image[>[
{%- elif part.type in ["video", "video_url"] -%}]<]video[>[
{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- macro render_value(value) -%}
{%- if value is string -%}{{ value }}{%- else -%}{{ value | tojson }}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages and messages[0].role == "system" -%}
{%- set system_text = render_content(messages[0].content) -%}
{%- set rest = messages[1:] -%}
{%- else -%}
{%- set system_text = "You are a helpful assistant." -%}
{%- set rest = messages -%}
{%- endif -%}
]~b]system
{{ system_text }}{% if tools %}

# Tools
You may call one or more tools to assist with the user query.
Here are the tools available in JSONSchema format:
<tools>
{% for tool in tools -%}
<tool>{{ (tool.function if tool.function is defined else tool) | tojson }}</tool>
{% endfor -%}
</tools>
To call tools, reply with:
]<]minimax[>[<tool_call>
]<]minimax[>[<invoke name="tool-name">
]<]minimax[>[<param-name>value]<]minimax[>[</param-name>
]<]minimax[>[</invoke>
]<]minimax[>[</tool_call>
{%- endif -%}
[e~[
{% for message in rest -%}
{%- if message.role == "user" -%}
]~b]user
{{ render_content(message.content) }}[e~[
{% elif message.role == "assistant" -%}
]~b]ai
{% if message.reasoning_content is defined and message.reasoning_content -%}
<mm:think>{{ message.reasoning_content }}</mm:think>
{%- endif -%}
{{ render_content(message.content) }}
{%- if message.tool_calls is defined and message.tool_calls -%}
]<]minimax[>[<tool_call>
{% for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
]<]minimax[>[<invoke name="{{ fn.name }}">
{% if fn.arguments is mapping -%}
{%- for key, value in fn.arguments.items() -%}
]<]minimax[>[<{{ key }}>{{ render_value(value) }}]<]minimax[>[</{{ key }}>
{% endfor -%}
{%- endif -%}
]<]minimax[>[</invoke>
{% endfor -%}
]<]minimax[>[</tool_call>
{%- endif -%}
[e~[
{% elif message.role == "tool" -%}
]~b]tool
<response>{{ render_content(message.content) }}</response>[e~[
{% elif message.role == "system" or message.role == "developer" -%}
]~b]developer
{{ render_content(message.content) }}[e~[
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
]~b]ai
{% if thinking_mode is defined and thinking_mode == "enabled" -%}
<mm:think>
{% elif thinking_mode is defined and thinking_mode == "disabled" -%}
</mm:think>
{%- endif -%}
{%- endif -%}
"""
