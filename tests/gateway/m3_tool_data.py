"""Tool-call test data shared by the gateway tests (a module of its own: `conftest` names clash across folders)."""

# M3's tool-call tags are namespaced: every tag of the block is preceded by this marker.
NS = "]<]minimax[>["
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
