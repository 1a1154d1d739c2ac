"""A tool loop with the openai client against `camelid serve` (the default model): the model picks a tool and
its arguments, the program runs it, the result goes back, and the model answers from it.

    camelid serve &
    python examples/agent.py
"""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("CAMELID_URL", "http://127.0.0.1:8000/v1"), api_key="none")


def get_weather(city: str, unit: str = "celsius") -> dict:
    return {"city": city, "temperature": 18 if unit == "celsius" else 64, "unit": unit, "sky": "cloudy"}


def get_time(tz: str) -> dict:
    return {"tz": tz, "time": "14:05"}


FUNCTIONS = {"get_weather": get_weather, "get_time": get_time}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather now in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time now in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
]

messages = [{"role": "user", "content": "What is the weather in Paris?"}]
choice = "required"  # a 135M model: make the first step a call (a larger model can start with "auto")
for _ in range(4):  # at most four rounds
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, tools=TOOLS,
                                           tool_choice=choice, parallel_tool_calls=False, temperature=0,
                                           max_tokens=100).choices[0].message
    messages.append(reply.model_dump(exclude_none=True))  # the calls go back as they came
    if not reply.tool_calls:
        break
    for call in reply.tool_calls:
        result = FUNCTIONS[call.function.name](**json.loads(call.function.arguments))
        print(f"call {call.function.name}({call.function.arguments}) -> {json.dumps(result)}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    choice = "none"  # the results are in: now answer from them
print("answer:", reply.content)
